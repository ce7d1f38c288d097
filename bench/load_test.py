"""Load test: many drivers at once against one local head (loopback, token auth), each creating a run and then
listing, getting and reading events for a fixed time. Checks that no call failed and that the log lost and
doubled nothing; prints calls/s and p50/p99 latency per call.

    python bench/load_test.py                      # 50 drivers, 60 s each
    python bench/load_test.py --drivers 8 --seconds 20

Runs in its own RAY_FINETUNE_HOME and stops its head at the end (`ray stop --force` stops every Ray on the machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

DRIVER = """
import json, sys, time
from ray_finetune import foundation_model as fm
model, data, seconds, index = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
latencies = {"create": [], "list": [], "get": [], "get_events": []}
errors = []
def timed(kind, call):
    started = time.perf_counter()
    try:
        return call()
    except Exception as error:
        errors.append(f"{kind}: {type(error).__name__}: {error}")
    finally:
        latencies[kind].append(time.perf_counter() - started)
fm.list(limit=1)   # connect before the clock starts
run = timed("create", lambda: fm.create(model=model, train_data_path=data, register_to="main.load.m" + index,
                                         context_length=64, training_duration="1ba",
                                         experiment_path="/load/driver" + index))
end = time.time() + seconds
while time.time() < end:
    timed("list", lambda: fm.list(limit=50))
    timed("get", lambda: fm.get(run.name))
    timed("get_events", lambda: fm.get_events(run.name))
print(json.dumps({"run": run.name if run else None, "latencies": latencies, "errors": errors}))
"""


def load(args: argparse.Namespace, work: Path) -> None:
    os.environ.update(RAY_FINETUNE_HOME=str(work / "home"), RAY_FINETUNE_MAX_CONCURRENT_RUNS="1")
    os.environ.pop("RAY_ADDRESS", None)
    from tiny_model import build_tiny_model, write_chat_jsonl

    from ray_finetune import cluster, events
    from ray_finetune import foundation_model as fm

    model = build_tiny_model(work / "model")
    data = write_chat_jsonl(work / "train.jsonl", 16)
    cluster.connect()
    env = {**os.environ, **cluster._auth_env(cluster.settings_module.load()),
           "RAY_ADDRESS": cluster.local_head_address(cluster.settings_module.load())}
    started = time.perf_counter()
    drivers = [subprocess.Popen([sys.executable, "-c", DRIVER, str(model), str(data), str(args.seconds), str(i)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(args.drivers)]
    results, crashed = [], []
    for driver in drivers:
        out, err = driver.communicate(timeout=args.seconds + 600)
        if driver.returncode != 0:
            crashed.append(err[-2000:])
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - started

    runs = [r["run"] for r in results if r["run"]]
    quoted = ", ".join(f"'{name}'" for name in runs)
    log = events.sql(f"SELECT count(*) AS events, count(DISTINCT idempotency_key) AS keys, min(seq) AS first, "
                     f"max(seq) AS last, count(*) FILTER (WHERE type = 'CREATED' AND run_name IN ({quoted})) "
                     f"AS created FROM events")
    whole = events.sql("SELECT count(*) AS n, max(seq) - min(seq) + 1 AS span FROM events")
    fm.cancel([name for name in runs if not fm.get(name).status.is_terminal()])
    errors = [e for r in results for e in r["errors"]]
    print(f"{args.drivers} drivers x {args.seconds:.0f} s on {os.cpu_count()} CPUs, wall {wall:.0f} s "
          f"(including driver start-up)")
    for kind in ("create", "list", "get", "get_events"):
        values = np.array([v for r in results for v in r["latencies"][kind]]) * 1000
        if len(values):
            print(f"  {kind:10s} {len(values):7,d} calls  {len(values) / args.seconds:7.1f}/s  "
                  f"p50 {np.percentile(values, 50):7.1f} ms  p99 {np.percentile(values, 99):7.1f} ms")
    print(f"  failed calls: {len(errors)}  crashed drivers: {len(crashed)}")
    print(f"  runs created: {len(runs)} of {args.drivers}; CREATED events for them: {int(log['created'][0])}")
    print(f"  log: {int(whole['n'][0])} events, seq gap-free: {int(whole['n'][0]) == int(whole['span'][0])}, "
          f"idempotency keys distinct: {int(log['events'][0]) == int(log['keys'][0])}")
    for message in (errors + crashed)[:5]:
        print("   ", message)
    cluster.down()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drivers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    # the runs' home and model; the local head may still be writing its last files as it stops
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True, prefix="rf-load-") as work:
        load(args, Path(work))


if __name__ == "__main__":
    main()
