"""Many drivers at once: 200 create() calls from 8 processes give 200 runs with unique names, none lost, started
in submission order; cancel by experiment id; 8 drivers each following its own run to the end see exactly what
the one log holds."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import ray

from ray_finetune import events as event_log
from ray_finetune import foundation_model as fm

pytestmark = pytest.mark.cluster
PROCESSES, RUNS_EACH = 8, 25

DRIVER = """
import json, sys
from ray_finetune import foundation_model as fm
names = [fm.create(model=sys.argv[1], train_data_path=sys.argv[2], register_to="main.load", context_length=128,
                   training_duration="1ba", experiment_path="/load/" + sys.argv[3]).name for _ in range(int(sys.argv[4]))]
print(json.dumps(names))
"""


def test_two_hundred_creates_from_eight_drivers(cluster, tiny_model, chat_data):
    drivers = [subprocess.Popen([sys.executable, "-c", DRIVER, str(tiny_model), str(chat_data[0]), f"d{i}",
                                 str(RUNS_EACH)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(PROCESSES)]
    names: list[str] = []
    for driver in drivers:
        out, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, err[-3000:]
        names += json.loads(out.strip().splitlines()[-1])
    assert len(names) == len(set(names)) == PROCESSES * RUNS_EACH

    quoted = ", ".join(f"'{n}'" for n in names)
    created = event_log.sql(f"SELECT run_name FROM events WHERE type = 'CREATED' AND run_name IN ({quoted}) "
                            "ORDER BY seq")["run_name"].tolist()
    assert sorted(created) == sorted(names)     # none lost, none doubled

    def started():
        return event_log.sql(f"SELECT run_name FROM events WHERE type = 'STARTED' AND run_name IN ({quoted}) "
                             "ORDER BY seq")["run_name"].tolist()

    deadline = time.monotonic() + 300
    while len(started()) < 3 and time.monotonic() < deadline:
        time.sleep(1)
    from actors import scheduler

    handle = scheduler.get_or_create()
    running = started()
    waiting = [n for n in ray.get(handle.queued.remote()) if n in set(names)]
    assert running + waiting == created[:len(running) + len(waiting)]   # first come, first served

    # cancel(experiment_id=...) stops every unfinished run of that experiment and says how many
    experiment = fm.get(waiting[-1]).experiment_id
    same_experiment = [n for n in waiting if fm.get(n).experiment_id == experiment]
    assert fm.cancel(experiment_id=experiment) == len(same_experiment) >= 1
    fm.cancel([n for n in names if not fm.get(n).status.is_terminal()])
    assert all(fm.get(n).status.is_terminal() for n in names)


FOLLOWER = """
import json, sys
from ray_finetune import foundation_model as fm
run = fm.create(model=sys.argv[1], train_data_path=sys.argv[2], register_to="main.followers", context_length=64,
                training_duration="1ba", experiment_path="/followers/" + sys.argv[3])
seen = [event.type for event in fm.get_events(run, follow=True)]
print(json.dumps({"name": run.name, "seen": seen, "status": fm.get(run).status.value}))
"""


def test_eight_drivers_each_create_and_follow_a_run_to_the_end(cluster, tiny_model, chat_data):
    drivers = [subprocess.Popen([sys.executable, "-c", FOLLOWER, str(tiny_model), str(chat_data[0]), f"f{i}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    results = []
    for driver in drivers:
        out, err = driver.communicate(timeout=900)
        assert driver.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len({r["name"] for r in results}) == 8
    for result in results:
        assert result["status"] == "COMPLETED"
        assert result["seen"][0] == "CREATED" and result["seen"][-1] == "COMPLETED"
        assert all(result["seen"].count(once) == 1 for once in ("CREATED", "DATA_VALIDATED", "COMPLETED"))
        # what each driver followed is what the one log holds, once
        logged = event_log.sql(f"SELECT type FROM run_events WHERE run_name = '{result['name']}' ORDER BY seq")
        assert logged["type"].tolist() == result["seen"]
