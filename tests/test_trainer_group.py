"""The DeepSpeed trainer group on CPU: 2 workers (one gloo group, ZeRO-2) give the same losses as 1."""
from __future__ import annotations

import pytest

from ray_finetune import spec as spec_module
from ray_finetune.data import formats, packing, sources
from ray_finetune.train.models import load_tokenizer
from tiny_model import write_chat_jsonl
from trainer_helpers import train_with

pytestmark = pytest.mark.cluster


def test_two_cpu_workers_give_the_same_losses_as_one(cluster, tiny_model, tmp_path):
    data = write_chat_jsonl(tmp_path / "train.jsonl", 64)
    tokenizer = load_tokenizer(tiny_model)
    examples = formats.examples_from_records(tokenizer, "CHAT_COMPLETION",
                                             sources.read_records(sources.locate("train", str(data))))
    rows, stats = packing.pack_examples(examples, 64, tokenizer.pad_token_id)
    rows.save(tmp_path / "rows")
    spec = spec_module.resolve(model=str(tiny_model), train_data_path=str(data), register_to="main.tests",
                               training_duration="2ep", learning_rate=2e-3, context_length=64)
    one, plan_one, _ = train_with(1, str(tmp_path / "rows"), stats, spec, cluster, tmp_path)
    two, plan_two, _ = train_with(2, str(tmp_path / "rows"), stats, spec, cluster, tmp_path)
    assert plan_one.global_batch_rows == plan_two.global_batch_rows >= 2
    assert plan_two.gradient_accumulation_steps * 2 == plan_one.gradient_accumulation_steps
    assert len(one) == len(two) == plan_one.total_steps
    assert one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-4)
