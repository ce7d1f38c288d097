"""What the test session leaves running is stopped by its mark, and only that: `make test` must not stop a
developer's own Ray cluster (as `ray stop --force` did)."""
from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from leftovers import MARK, marked, stop_leftovers

SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_only_the_processes_carrying_the_mark_are_stopped():
    mark = f"test-{os.getpid()}-leftovers"
    ours = subprocess.Popen(SLEEP, env={**os.environ, MARK: mark})
    others = [subprocess.Popen(SLEEP, env={k: v for k, v in os.environ.items() if k != MARK}),
              subprocess.Popen(SLEEP, env={**os.environ, MARK: mark + "-another-session"})]
    try:
        assert [p.pid for p in marked(mark)] == [ours.pid]
        assert stop_leftovers(mark) == 1
        assert ours.wait(timeout=10) is not None
        assert all(p.poll() is None for p in others)
    finally:
        for process in [ours, *others]:
            process.kill()
            process.wait()


@pytest.mark.cluster
def test_every_process_of_the_sessions_head_carries_the_mark(cluster):
    from ray_finetune import cluster as cluster_module

    head = cluster_module.head_processes(cluster_module.local_head_address(cluster))
    assert len(head) > 3   # its GCS, raylet, agents and workers
    unmarked = {p.pid for p in head} - {p.pid for p in marked(os.environ[MARK])}
    assert not unmarked, [" ".join(psutil.Process(pid).cmdline())[:200] for pid in unmarked]
