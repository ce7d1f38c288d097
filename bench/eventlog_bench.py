"""The cost of event sourcing as the log grows: 10,000 runs and 1,000,000 events.

Measures append throughput (bulk and one event per call, the per-step pattern), the cold replay the event-store
actor does when it starts, and the latency users see through the actor (fm.get, fm.list, fm.get_events), against
the naive peer: replaying the whole log on every read (what a projection-less event store does).

    python bench/eventlog_bench.py [--runs 10000] [--events-per-run 100]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray

from eventstore.actor import EventStoreActor
from eventstore.replay import replay
from eventstore.schema import EventType, NewEvent
from eventstore.store import EventStore

SPEC = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "train_data_path": "/Volumes/main/default/raw/train.jsonl",
        "register_to": "main.demo", "task_type": "CHAT_COMPLETION", "training_duration": "2ep",
        "learning_rate": 5e-5, "context_length": 2048, "created_by": "bench", "eval_prompts": ["hello"]}


def run_events(name: str, count: int) -> list[NewEvent]:
    def event(kind: EventType, **payload) -> NewEvent:
        return NewEvent(run_name=name, type=kind, actor="bench", message=kind.value.lower(), payload=payload)

    head = [event(EventType.CREATED, spec=SPEC, experiment_id="1", run_id="r", save_folder="/s"),
            event(EventType.QUEUED), event(EventType.STARTED, attempt=1), event(EventType.DATA_VALIDATED, rows=100),
            event(EventType.MODEL_INITIALIZED, parameters=134_515_008), event(EventType.TRAIN_STARTED)]
    tail = [event(EventType.CHECKPOINT_SAVED, path=f"/s/{name}/checkpoints/ep1-ba10", epoch=1, step=10),
            event(EventType.TRAIN_FINISHED), event(EventType.COMPLETED)]
    steps = [event(EventType.TRAIN_UPDATED, step=i + 1, total_steps=count, loss=2.0 - i / count,
                   tokens_per_second=4000.0) for i in range(count - len(head) - len(tail))]
    return head + steps + tail


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(1000 * statistics.median(ordered), 2),
            "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 2)}


def timed(call, repeat: int) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def measure(args: argparse.Namespace, path: Path) -> None:
    store = EventStore(path)
    result: dict[str, object] = {"runs": args.runs, "events": args.runs * args.events_per_run}

    started = time.perf_counter()
    for first in range(0, args.runs, 10):   # ten runs per batch, 1,000 events per append
        store.append([e for i in range(first, min(first + 10, args.runs))
                      for e in run_events(f"run-{i:05d}", args.events_per_run)])
    bulk_s = time.perf_counter() - started
    result["append_bulk_events_per_s"] = round(args.runs * args.events_per_run / bulk_s)
    single = [NewEvent(run_name="run-00000", type=EventType.TRAIN_UPDATED, actor="bench", message="step",
                       payload={"step": i}, idempotency_key=f"single-{i}") for i in range(500)]
    started = time.perf_counter()
    for event in single:
        store.append([event])
    result["append_one_per_call_events_per_s"] = round(len(single) / (time.perf_counter() - started))
    started = time.perf_counter()
    all_events = store.events()
    naive_list_s = time.perf_counter() - started
    started = time.perf_counter()
    replay(all_events)
    naive_list_s += time.perf_counter() - started
    del all_events
    store.close()

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    actor = EventStoreActor.remote(str(path))
    stats = ray.get(actor.stats.remote())
    result["cold_replay_s"] = round(stats["cold_replay_s"], 2)
    name = f"run-{args.runs // 2:05d}"
    result["fm.get (state + user events)"] = timed(
        lambda: ray.get([actor.run_state.remote(name), actor.events.remote(run_name=name)]), 200)
    result["fm.list (all runs)"] = timed(lambda: ray.get(actor.run_states.remote()), 20)
    result["fm.get_events"] = timed(lambda: ray.get(actor.events.remote(run_name=name)), 200)
    result["append one event through the actor"] = timed(lambda: ray.get(actor.append.remote([NewEvent(
        run_name=name, type=EventType.TRAIN_UPDATED, actor="bench", message="x", payload={})])), 200)
    result["peer: full replay per fm.list_s"] = round(naive_list_s, 2)
    result["ratio fm.list: peer / ours"] = round(naive_list_s / (result["fm.list (all runs)"]["p50_ms"] / 1000), 1)
    print(json.dumps(result, indent=2))
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--events-per-run", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eventlog-bench-") as folder:   # a million events
        measure(args, Path(folder) / "events.duckdb")


if __name__ == "__main__":
    main()
