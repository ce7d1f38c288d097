"""What the actor machinery costs a run: the time from fm.create() to the first training step (phase by phase,
from the run's own events; for the first run on a fresh head and for the next one), and the per-step overhead of
reporting (TRAIN_UPDATED event + MLflow metrics + the stop check) against the step itself.

    python bench/actor_overhead.py                 # tiny model (steps of ~0.05 s: the worst case)
    python bench/actor_overhead.py --model smollm2 # SmolLM2-135M-Instruct at context 512

Runs in its own RAY_FINETUNE_HOME on a local head it starts, and stops that head at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PHASES = ["CREATED", "STARTED", "DATA_VALIDATED", "PLACED", "MODEL_INITIALIZED", "TRAIN_STARTED", "TRAIN_UPDATED"]


class Timed:
    """Wraps a reporter and adds up the time the training loop spends in it."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds, self.steps = inner, 0.0, []

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                if name in ("step_finished", "stop_requested"):
                    self.seconds += time.perf_counter() - started
                if name == "step_finished":
                    self.steps.append(args[0].step_seconds)
        return timed


def per_step_overhead(model: str, data: Path, context: int, steps: int, work: Path, settings) -> dict:

    from actors import evaluator
    from actors.messages import PackedData, RunContext, TrainRequest
    from actors.trainer_group import EventReporter
    from ray_finetune import spec as spec_module
    from ray_finetune import tracking
    from ray_finetune.data.prepare import prepare
    from ray_finetune.spec import Duration
    from ray_finetune.train import loop
    from ray_finetune.train.distributed import join_process_group
    from ray_finetune.train.models import load_tokenizer
    from ray_finetune.train.plan import make_plan

    join_process_group(0, 1)
    prepared = prepare("train_data_path", str(data), task_type="CHAT_COMPLETION", model_path=model,
                       tokenizer=load_tokenizer(model), context_length=context, cache_dir=work / "cache")
    plan = make_plan(rows=prepared.stats["rows"], tokens=prepared.stats["tokens"],
                     duration=Duration(value=steps, unit="ba"), world_size=1, seed=0)
    spec = spec_module.resolve(model=model, train_data_path=str(data), register_to="main.bench",
                               training_duration=f"{steps}ba", context_length=context, checkpoint_interval="100000ba")
    tracked = tracking.start_run(settings, experiment_path="/bench/overhead", run_name="overhead", params={})
    request = TrainRequest(run=RunContext(run_name="overhead-bench", spec=spec, mlflow_run_id=tracked.run_id,
                                          save_folder=str(work / "save")),
                           data=PackedData(train_rows_path=prepared.rows_path, train_stats=prepared.stats), plan=plan)
    reporter = Timed(EventReporter(request, evaluator.get_or_create(), lambda: loop.STOP_NONE))
    config = loop.TrainConfig(run_name="overhead-bench", model_path=model, init_weights_path=None,
                              train_rows_path=prepared.rows_path, plan=plan, learning_rate=1e-4,
                              save_folder=str(work / "save"), rank=0, world_size=1, seed=0,
                              checkpoint_every=spec.checkpoint_every)
    loop.train(config, reporter)
    if hasattr(reporter.inner, "close"):
        started = time.perf_counter()
        reporter.inner.close()
        reporter.seconds += time.perf_counter() - started
    step = sum(reporter.steps) / len(reporter.steps)
    return {"steps": len(reporter.steps), "step_s": step, "overhead_s": reporter.seconds / len(reporter.steps)}


def create_to_first_step(model: str, data: Path, context: int) -> dict:
    import ray

    from actors.event_sink import event_store
    from ray_finetune import foundation_model as fm

    started = time.time()
    run = fm.create(model=model, train_data_path=str(data), register_to="main.bench.first_step",
                    training_duration="2ba", context_length=context)
    returned = time.time() - started
    run.wait(timeout=1800)
    events = ray.get(event_store().events.remote(run_name=run.name))
    first = {}
    for event in events:
        first.setdefault(event.type, event)
    times = [first[kind].time.timestamp() for kind in PHASES]
    step = first["TRAIN_UPDATED"].payload["step_seconds"]
    ended = {kind: first[kind].time.timestamp() for kind in ("TRAIN_FINISHED", "REGISTERED", "COMPLETED")}
    return {"create_call_s": returned, "phases": {f"{a} → {b}": t2 - t1 for a, b, t1, t2 in
                                                  zip(PHASES, PHASES[1:], times, times[1:])},
            "to_first_step_s": times[-1] - times[0] - step, "first_step_s": step,
            "registration_s": ended["COMPLETED"] - ended["TRAIN_FINISHED"],
            "whole_run_s": ended["COMPLETED"] - times[0]}


def measure(args: argparse.Namespace, work: Path) -> None:
    os.environ.update(RAY_FINETUNE_HOME=str(work / "home"))
    os.environ.pop("RAY_ADDRESS", None)
    from tiny_model import build_tiny_model

    from ray_finetune import cluster
    from ray_finetune.train.models import resolve_model

    if args.model == "tiny":
        model, context = str(build_tiny_model(work / "model")), 128
    else:
        model, context = str(resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").path), 512
    data = ROOT / "ray_finetune" / "demo_data" / "chat_train.jsonl"
    # The next run gets other data (all but the last line), so it tokenizes instead of reading the first's rows.
    other = work / "chat_train_but_one.jsonl"
    other.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))
    settings = cluster.connect()
    try:
        runs = {"first run on a fresh head": create_to_first_step(model, data, context),
                "next run (other data)": create_to_first_step(model, other, context)}
        overhead = per_step_overhead(model, data, context, args.steps, work, settings)
    finally:
        cluster.down()
    print(f"model {args.model}, context {context}, {os.cpu_count()} CPUs")
    for title, run in runs.items():
        print(f"{title}: create() returned in {run['create_call_s']:.2f} s; create → first step "
              f"{run['to_first_step_s']:.1f} s (first step itself {run['first_step_s']:.2f} s):")
        for phase, seconds in run["phases"].items():
            print(f"  {phase:38s} {seconds:6.2f} s")
        print(f"  TRAIN_FINISHED → COMPLETED (registration) {run['registration_s']:.2f} s; CREATED → COMPLETED "
              f"{run['whole_run_s']:.1f} s (2 steps)")
    print(f"per step: {overhead['step_s'] * 1000:.1f} ms training, {overhead['overhead_s'] * 1000:.2f} ms reporting "
          f"({overhead['overhead_s'] / overhead['step_s']:.1%}) over {overhead['steps']} steps")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    # the runs' home, model and checkpoints; the local head may still be writing its last files as it stops
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True, prefix="rf-overhead-") as work:
        measure(args, Path(work))


if __name__ == "__main__":
    main()
