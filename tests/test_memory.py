"""Micro-batch fitting: the largest size that runs is kept, out-of-memory backs off, the step stays the same."""
from __future__ import annotations

import pytest
import torch

from ray_finetune.spec import Duration
from ray_finetune.train.memory import (checkpoint_activations, fit_micro_batch, largest_fitting,
                                       micro_batch_candidates, with_micro_batch)
from ray_finetune.train.plan import make_plan


def test_candidates_divide_the_rows_of_a_rank_largest_first():
    assert micro_batch_candidates(12) == [12, 6, 4, 3, 2, 1]
    assert micro_batch_candidates(1) == [1]


def test_backs_off_until_a_size_fits():
    tried = []

    def try_size(size: int) -> None:
        tried.append(size)
        if size > 4:
            raise torch.OutOfMemoryError(f"{size} rows do not fit")

    assert largest_fitting([16, 8, 4, 2, 1], try_size) == (4, [16, 8])
    assert tried == [16, 8, 4]


def test_says_what_to_do_when_nothing_fits():
    def never(size: int) -> None:
        raise torch.OutOfMemoryError("no")

    with pytest.raises(torch.OutOfMemoryError, match="context_length"):
        largest_fitting([2, 1], never)


def test_other_errors_are_not_taken_for_out_of_memory():
    def broken(size: int) -> None:
        raise RuntimeError("a bug, not a size problem")

    with pytest.raises(RuntimeError, match="a bug"):
        largest_fitting([2, 1], broken)


def test_activations_are_recomputed_only_when_not_even_one_row_fits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 20, 16 << 20))
    plan = make_plan(rows=64, tokens=6400, duration=Duration(value=1, unit="ep"), world_size=1, seed=0)
    assert 2 in micro_batch_candidates(plan.global_batch_rows) and plan.global_batch_rows > 2
    recomputing = []

    def try_rows(size: int) -> None:   # without recomputation nothing fits; with it, up to 2 rows
        if not recomputing or size > 2:
            raise torch.OutOfMemoryError(f"{size} rows")

    def recompute() -> bool:
        recomputing.append(True)
        return True

    fitted, notes = fit_micro_batch(plan, 1000, torch.device("cpu"), try_rows, recompute)
    assert recomputing == [True] and notes["activation_checkpointing"] is True
    assert fitted.micro_batch_rows == 2
    assert notes["out_of_memory_at"] == [s for s in micro_batch_candidates(plan.global_batch_rows) if s > 2]

    recomputing.append(True)     # already recomputing: a size that fits needs no more
    fitted, notes = fit_micro_batch(plan, 1000, torch.device("cpu"), try_rows, recompute)
    assert notes["activation_checkpointing"] is False and fitted.micro_batch_rows == 2

    recomputing.clear()          # off ("RAY_FINETUNE_ACTIVATION_CHECKPOINTING=off"): nothing fits, say so
    with pytest.raises(torch.OutOfMemoryError, match="context_length"):
        fit_micro_batch(plan, 1000, torch.device("cpu"), try_rows, None)


def test_checkpointed_activations_give_the_same_gradients(tiny_model):
    from ray_finetune.train.models import load_model

    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 24))
    gradients = []
    for recompute in (False, True):
        model = load_model(tiny_model)
        model.train()
        if recompute:
            assert checkpoint_activations(model) and model.is_gradient_checkpointing
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        gradients.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*gradients):
        torch.testing.assert_close(recomputed, plain)


def test_trials_run_as_training_will(tiny_model, tmp_path):
    """A loaded model is in evaluation mode, where checkpointing does not engage: a trial there would size the
    micro-batch for memory training does not get. With checkpointing on, each layer's parts run again in the
    backward pass (counted by wrapping a part's forward: module hooks do not fire in the recomputation)."""
    from ray_finetune.data.packing import PackedRows
    from ray_finetune.train import loop
    from ray_finetune.train.models import load_model
    from trainer_helpers import packed_chat_run

    rows = PackedRows.load(packed_chat_run(tiny_model, tmp_path)[0])
    runs = {}
    for recompute in (False, True):
        model = load_model(tiny_model)
        assert not model.training
        if recompute:
            checkpoint_activations(model)
        try_rows = loop.trial_step(model, rows, torch.device("cpu"))
        calls, mlp = [], model.model.layers[0].mlp
        mlp.forward = lambda *args, _forward=mlp.forward, **kwargs: calls.append(1) or _forward(*args, **kwargs)
        try_rows(2)
        runs[recompute] = len(calls)
        assert not model.training                     # left as it was
    assert runs[True] == 2 * runs[False] > 0


def test_a_new_micro_batch_keeps_every_step_the_same():
    plan = make_plan(rows=100, tokens=10_000, duration=Duration(value=2, unit="ep"), world_size=2, seed=3)
    fitted = with_micro_batch(plan, 4)
    assert fitted.micro_batch_rows * fitted.gradient_accumulation_steps == plan.global_batch_rows // 2
    for step in range(plan.total_steps):
        for rank in range(2):
            before = [list(m) for m in plan.rank_micro_batches(step, rank)]
            after = [list(m) for m in fitted.rank_micro_batches(step, rank)]
            assert sum(before, []) == sum(after, [])       # the same rows, in the same order
            assert all(len(m) == 4 for m in after)


def test_set_up_falls_back_to_sdpa_and_fits_a_micro_batch(tiny_model, tmp_path, monkeypatch):
    """The trainer's set-up, run on CPU before any GPU session: FlexAttention cannot run a backward pass here (a
    real failure of the faster kernel), so the model falls back to SDPA and says why; then a micro-batch is fitted
    with the optimizer's memory held (the device's memory is what mem_get_info reports, stubbed)."""
    from ray_finetune.train import loop
    from ray_finetune.train.hardware import FP32
    from ray_finetune.train.models import load_model
    from trainer_helpers import packed_chat_run

    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    from ray_finetune.data.packing import PackedRows

    rows = PackedRows.load(rows_path)
    plan = make_plan(rows=stats.rows, tokens=stats.tokens, duration=Duration(value=1, unit="ep"), world_size=1,
                     seed=0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))
    model = load_model(tiny_model, attention="flex_attention")
    notes = loop._ready_model(model, rows, torch.device("cpu"), FP32, stage=2, compile_layers=False)
    assert model.config._attn_implementation == "sdpa" and "flex_attention failed" in notes["attention_fallback"]
    fitted, notes = fit_micro_batch(plan, sum(p.numel() for p in model.parameters()), torch.device("cpu"),
                                    loop.trial_step(model, rows, torch.device("cpu")))
    assert model.config._attn_implementation == "sdpa"
    per_rank = plan.global_batch_rows
    assert fitted.micro_batch_rows == per_rank == notes["micro_batch_rows"]      # plenty of room: all rows at once
    assert fitted.gradient_accumulation_steps == 1 and notes["out_of_memory_at"] == []
    assert all(p.grad is None for p in model.parameters())                        # trials leave no gradients
