"""The DeepSpeed trainer group on CPU: 2 workers (one gloo group, ZeRO-2) give the same losses as 1."""
from __future__ import annotations

import asyncio

import pytest
import ray

from actors.evaluator import Evaluator
from actors.event_sink import event_store
from actors.messages import PackedData, RunContext, TrainRequest
from actors.trainer_group import TrainerGroup
from ray_finetune import spec as spec_module
from ray_finetune import tracking
from ray_finetune.data import formats, packing, sources
from ray_finetune.train.models import load_tokenizer
from ray_finetune.train.plan import make_plan
from tiny_model import write_chat_jsonl

pytestmark = pytest.mark.cluster


def train_with(world_size: int, rows_path: str, stats, spec, cluster, tmp_path) -> tuple[list[float], object]:
    name = f"group-test-{world_size}"
    tracked = tracking.start_run(cluster, experiment_path=f"/tests/{name}", run_name=name, params={})
    context = RunContext(run_name=name, spec=spec, mlflow_run_id=tracked.run_id, save_folder=str(tmp_path / name))
    plan = make_plan(rows=stats.rows, tokens=stats.tokens, duration=spec.duration, world_size=world_size,
                     seed=spec.seed)
    group = TrainerGroup(world_size)
    try:
        asyncio.run(group.ready())
        request = TrainRequest(run=context, data=PackedData(train_rows_path=rows_path, train_stats=stats.as_dict()),
                               plan=plan)
        asyncio.run(group.train(request, Evaluator.remote()))
    finally:
        group.shutdown()
    events = ray.get(event_store().events.remote(run_name=name, types=["TRAIN_UPDATED"]))
    return [e.payload["loss"] for e in events], plan


def test_two_cpu_workers_give_the_same_losses_as_one(cluster, tiny_model, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", 64)
    tokenizer = load_tokenizer(tiny_model)
    examples = formats.examples_from_records(tokenizer, "CHAT_COMPLETION",
                                             sources.read_records(sources.locate("train", str(data))))
    rows, stats = packing.pack_examples(examples, 64, tokenizer.pad_token_id)
    rows.save(tmp_path / "rows")
    spec = spec_module.resolve(model=str(tiny_model), train_data_path=str(data), register_to="main.tests",
                               training_duration="2ep", learning_rate=2e-3, context_length=64)
    one, plan_one = train_with(1, str(tmp_path / "rows"), stats, spec, cluster, tmp_path)
    two, plan_two = train_with(2, str(tmp_path / "rows"), stats, spec, cluster, tmp_path)
    assert plan_one.global_batch_rows == plan_two.global_batch_rows >= 2
    assert plan_two.gradient_accumulation_steps * 2 == plan_one.gradient_accumulation_steps
    assert len(one) == len(two) == plan_one.total_steps
    assert one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-4)
