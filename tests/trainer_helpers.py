"""Running a TrainerGroup directly (without the scheduler) and reading back its per-step losses."""
from __future__ import annotations

import asyncio
from pathlib import Path

import ray

from actors import evaluator, scheduler
from actors.event_sink import event_store
from actors.messages import PackedData, RunContext, TrainRequest
from actors.trainer_group import TrainerGroup
from ray_finetune import spec as spec_module
from ray_finetune import tracking
from ray_finetune.data import formats, packing, sources
from ray_finetune.train.models import load_tokenizer
from ray_finetune.train.plan import make_plan
from tiny_model import write_chat_jsonl


# Enough examples (134 rows) for batches of two rows (train/plan.choose_global_batch_rows): one worker and two then
# train the same steps, one taking both rows of each, two taking a row each.
TWO_ROW_BATCHES = 160


def packed_chat_run(model: str, folder: Path, count: int = 64) -> tuple[str, object, object]:
    """`count` chat examples (64: 54 rows) packed at context 64 into `folder/rows`, and the spec of a 2-epoch run on
    them: (rows path, packing stats, spec)."""
    data = write_chat_jsonl(folder / "train.jsonl", count)
    tokenizer = load_tokenizer(model)
    examples = formats.examples_from_records(tokenizer, "CHAT_COMPLETION",
                                             sources.read_records(sources.locate("train", str(data))))
    rows, stats = packing.pack_examples(examples, 64, tokenizer.pad_token_id)
    rows.save(folder / "rows")
    spec = spec_module.resolve(model=str(model), train_data_path=str(data), register_to="main.tests",
                               training_duration="2ep", learning_rate=2e-3, context_length=64)
    return str(folder / "rows"), stats, spec


def train_with(world_size: int, rows_path: str, stats, spec, cluster, tmp_path, resources=None,
               label: str = "") -> tuple[list[float], object, list[str]]:
    """Losses per step, the plan, and the node of each rank."""
    name = f"group-test{label}-{world_size}"
    tracked = tracking.start_run(cluster, experiment_path=f"/tests/{name}", run_name=name, params={})
    context = RunContext(run_name=name, spec=spec, mlflow_run_id=tracked.run_id, save_folder=str(tmp_path / name))
    plan = make_plan(rows=stats.rows, tokens=stats.tokens, duration=spec.duration, world_size=world_size,
                     seed=spec.seed)
    # A scheduler that starts removes every trainer placement it finds (its predecessor's): let it start first.
    ray.get(scheduler.get_or_create().queued.remote())
    group = TrainerGroup(world_size, resources=resources)
    try:
        nodes = asyncio.run(group.ready())
        request = TrainRequest(run=context, data=PackedData(train_rows_path=rows_path, train_stats=stats.as_dict()),
                               plan=plan)
        asyncio.run(group.train(request, evaluator.get_or_create()))
    finally:
        group.shutdown()
    events = ray.get(event_store().events.remote(run_name=name, types=["TRAIN_UPDATED"]))
    return [e.payload["loss"] for e in events], plan, nodes
