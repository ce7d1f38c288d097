"""The schedule and the plan: warmup then decay to 0, every row once per epoch, ranks split each step."""
from __future__ import annotations

import numpy as np
import pytest

from ray_finetune.spec import parse_duration
from ray_finetune.train.plan import EMPTY_ROW, continued_plan, make_plan
from ray_finetune.train.schedule import lr_factor, warmup_steps


def test_warmup_is_two_percent_then_linear_decay_to_zero():
    total = 500
    assert warmup_steps(total) == 10
    factors = [lr_factor(s, total) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(1 / 490) and lr_factor(total, total) == 0.0


@pytest.mark.parametrize("duration, steps", [("3ep", 3 * 88), ("7ba", 7), ("2000tok", 2), ("1_000_000tok", 1000)])
def test_durations_become_steps(duration, steps):
    plan = make_plan(rows=700, tokens=88_000, duration=parse_duration(duration), world_size=1, seed=0)
    assert plan.global_batch_rows == 8 and plan.steps_per_epoch == 88
    assert plan.total_steps == steps


@pytest.mark.parametrize("rows, batch, steps_per_epoch", [
    (13, 1, 13),           # a handful of rows: one a step
    (78, 1, 78),           # 300 chats at context 512 (bench/batch_policy.py)
    (300, 4, 75),          # at least 64 steps an epoch while the batch is below its cap
    (5_000, 64, 79),       # large data: 64 rows a step
    (100_000, 64, 1563),
])
def test_small_data_gets_many_small_steps_and_large_data_full_batches(rows, batch, steps_per_epoch):
    plan = make_plan(rows=rows, tokens=rows * 100, duration=parse_duration("1ep"), world_size=1, seed=0)
    assert (plan.global_batch_rows, plan.steps_per_epoch) == (batch, steps_per_epoch)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_each_epoch_reads_every_row_once_split_across_ranks(world_size):
    plan = make_plan(rows=37, tokens=1, duration=parse_duration("2ep"), world_size=world_size, seed=3)
    for epoch in range(2):
        seen = []
        for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
            per_rank = [np.concatenate(plan.rank_micro_batches(step, rank)) for rank in range(world_size)]
            assert np.array_equal(np.concatenate(per_rank), plan.step_rows(step))
            seen.extend(r for r in plan.step_rows(step) if r != EMPTY_ROW)
        assert sorted(seen) == list(range(37))


def test_a_batch_given_to_the_plan_sets_its_steps():   # bench/batch_policy.py weighs other batches this way
    plan = make_plan(rows=78, tokens=1, duration=parse_duration("2ep"), world_size=1, seed=0, global_batch_rows=8)
    assert (plan.global_batch_rows, plan.gradient_accumulation_steps, plan.steps_per_epoch, plan.total_steps) == (
        8, 8, 10, 20)


def test_batch_size_does_not_depend_on_the_number_of_workers_when_data_allows():
    sizes = {make_plan(rows=512, tokens=1, duration=parse_duration("1ep"), world_size=w, seed=0).global_batch_rows
             for w in (1, 2, 4, 8)}
    assert sizes == {8}


def test_a_resumed_run_keeps_the_steps_of_its_checkpoint_on_any_number_of_workers():
    """The scheduler continues a checkpoint under the plan it holds: a run written by 2 workers resumed on 1 or 4
    (or by a version that chooses batches differently) reads the same rows at every step."""
    saved = make_plan(rows=300, tokens=30_000, duration=parse_duration("2ep"), world_size=2, seed=7)
    assert saved.global_batch_rows == 4
    for workers, expected in ((1, 1), (2, 2), (4, 4), (3, 2), (8, 4)):   # 4 rows split over 3 workers: over 2
        plan = continued_plan(saved.as_dict(), workers)
        assert plan.world_size == expected and plan.micro_batch_rows * plan.gradient_accumulation_steps * expected == 4
        assert (plan.total_steps, plan.steps_per_epoch, plan.global_batch_rows) == (150, 75, 4)
        for step in (0, 74, 75, 149):
            assert np.array_equal(plan.step_rows(step), saved.step_rows(step))
            assert np.array_equal(np.concatenate([np.concatenate(plan.rank_micro_batches(step, rank))
                                                  for rank in range(expected)]), saved.step_rows(step))
    older = dict(saved.as_dict(), global_batch_rows=8, steps_per_epoch=38, total_steps=76)   # an earlier policy's
    assert continued_plan(older, 1).global_batch_rows == 8 and continued_plan(older, 1).total_steps == 76
    assert continued_plan(make_plan(rows=13, tokens=1, duration=parse_duration("1ep"), world_size=1, seed=0)
                          .as_dict(), 8).world_size == 1                                   # one row a step


def test_a_run_gets_its_share_of_the_gpus_and_one_worker_on_cpu():
    from ray_finetune.train.plan import trainer_world_size

    assert trainer_world_size(gpus=0, requested=0, concurrent_runs=1) == 1        # CPU default
    assert trainer_world_size(gpus=0, requested=2, concurrent_runs=1) == 2        # CPU, asked for
    assert trainer_world_size(gpus=8, requested=0, concurrent_runs=1) == 8        # all GPUs to the one run
    assert trainer_world_size(gpus=8, requested=0, concurrent_runs=3) == 2        # equal shares, whole GPUs
    assert trainer_world_size(gpus=8, requested=4, concurrent_runs=1) == 4        # capped
    assert trainer_world_size(gpus=2, requested=0, concurrent_runs=4) == 1        # never zero


def test_trainers_take_gpus_when_there_are_some_or_when_told_to_wait_for_them():
    from ray_finetune.train.plan import trainer_group_size

    assert trainer_group_size(gpus=8, device="auto", requested=0, concurrent_runs=1) == (8, True)
    assert trainer_group_size(gpus=0, device="auto", requested=0, concurrent_runs=1) == (1, False)
    # an autoscaling cluster whose GPU nodes are not up yet: "gpu" waits for them instead of training on CPUs
    assert trainer_group_size(gpus=0, device="gpu", requested=8, concurrent_runs=1) == (8, True)
    assert trainer_group_size(gpus=8, device="cpu", requested=2, concurrent_runs=1) == (2, False)
