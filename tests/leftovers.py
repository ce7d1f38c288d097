"""What a test session started and left running: every process that carries the session's mark in its environment
(Ray heads and nodes the tests started, their workers and trainers, drivers). Ray processes inherit the environment
of whoever started them, so the mark reaches all of them, and no process the session did not start carries it.

conftest marks the session and stops its leftovers when it ends; `make test` runs this file after pytest as well
(`python tests/leftovers.py MARK`), for a session that crashed or was killed before it could. Either stops nothing
else on the machine: a developer's own Ray cluster, with its runs, goes on (`ray stop --force` would stop it).
"""
from __future__ import annotations

import sys

import psutil

# Not RAY_*: the multi-node tests hand their nodes a copy of the environment without RAY_* variables.
MARK = "FINETUNE_TEST_SESSION"


def marked(mark: str) -> list[psutil.Process]:
    """The processes carrying `mark`, and their descendants (Ray's agents retitle themselves over the memory their
    environment was read from), other than this one, those it runs in (pytest under make, ...) and its helpers."""
    this = psutil.Process()
    spared = {this.pid, *(parent.pid for parent in this.parents())}
    # this process's multiprocessing helpers (the rank processes' forkserver, its resource tracker) end with it
    spared |= {child.pid for child in this.children() if "from multiprocessing." in _command(child)}
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        try:
            if process.pid not in spared and process.environ().get(MARK) == mark:
                for member in [process, *process.children(recursive=True)]:
                    found.setdefault(member.pid, member)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return [process for pid, process in found.items() if pid not in spared]


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):   # ended meanwhile
        return ""


def stop_leftovers(mark: str) -> int:
    """Stop the processes carrying `mark`; returns how many there were."""
    from ray_finetune.cluster import stop_processes

    found = marked(mark)
    stop_processes(found)
    return len(found)


if __name__ == "__main__":
    stopped = stop_leftovers(sys.argv[1])
    if stopped:
        print(f"stopped {stopped} process(es) the test session left running")
