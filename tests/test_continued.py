"""Continued training from an earlier run's checkpoint (custom_weights_path): weights only, own schedule."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_finetune import foundation_model as fm
from ray_finetune.entities import RunStatus
from ray_finetune.errors import ValidationError
from tiny_model import build_tiny_model

pytestmark = pytest.mark.cluster


def create(tiny_model, chat_data, **overrides):
    arguments = dict(model=str(tiny_model), train_data_path=str(chat_data[0]), register_to="main.continued",
                     learning_rate=1e-3, context_length=128, training_duration="1ep")
    arguments.update(overrides)
    return fm.create(**arguments)


def first_loss(name: str) -> float:
    return next(e.payload["loss"] for e in fm.get_events(name) if e.type == "TRAIN_UPDATED")


def test_the_pointer_idiom_continues_from_the_weights_with_a_new_schedule(cluster, tiny_model, chat_data, tmp_path):
    base = create(tiny_model, chat_data).wait(timeout=300)
    assert base.status == RunStatus.COMPLETED, base.details
    pointer = f"{base.save_folder}/{base.name}/checkpoints/latest-sharded-rank0.symlink"
    continued = create(tiny_model, chat_data, custom_weights_path=pointer).wait(timeout=300)
    assert continued.status == RunStatus.COMPLETED, continued.details
    updates = [e.payload for e in fm.get_events(continued.name) if e.type == "TRAIN_UPDATED"]
    assert updates[0]["step"] == 1 and updates[-1]["step"] == updates[0]["total_steps"]
    assert first_loss(continued.name) < first_loss(base.name)   # it starts where the first run ended

    # A .pt state dict works too, and so does a file:// checkpoint folder.
    weights = Path(fm.get_checkpoints(base.name)[-1]) / "model"
    from transformers import AutoModelForCausalLM

    state_file = tmp_path / "weights.pt"
    torch.save(AutoModelForCausalLM.from_pretrained(weights).state_dict(), state_file)
    from_pt = create(tiny_model, chat_data, custom_weights_path=str(state_file)).wait(timeout=300)
    assert from_pt.status == RunStatus.COMPLETED, from_pt.details
    assert first_loss(from_pt.name) == pytest.approx(first_loss(continued.name), rel=1e-5)
    spec_only = fm.create(model=str(tiny_model), train_data_path=str(chat_data[0]), register_to="main.continued",
                          context_length=128, custom_weights_path="file://" + fm.get_checkpoints(base.name)[-1])
    fm.cancel([spec_only.name])


def test_a_checkpoint_of_another_architecture_is_refused_before_queueing(cluster, tiny_model, chat_data, tmp_path):
    other = build_tiny_model(tmp_path / "wider", hidden_size=96)
    with pytest.raises(ValidationError, match="custom_weights_path.*different architecture.*hidden_size=96"):
        create(tiny_model, chat_data, custom_weights_path=str(other))
    bad_pt = tmp_path / "bad.pt"
    torch.save({"model.embed_tokens.weight": torch.zeros(3, 3)}, bad_pt)
    with pytest.raises(ValidationError, match="does not match the base model"):
        create(tiny_model, chat_data, custom_weights_path=str(bad_pt))
    with pytest.raises(ValidationError, match="pointer file"):
        create(tiny_model, chat_data, custom_weights_path=str(tmp_path / "latest-sharded-rank0.symlink"))
