"""Micro-batch fitting: the largest size that runs is kept, out-of-memory backs off, the step stays the same."""
from __future__ import annotations

import pytest
import torch

from ray_finetune.spec import Duration
from ray_finetune.train.memory import largest_fitting, micro_batch_candidates, with_micro_batch
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
