"""The schedule and the plan: warmup then decay to 0, every row once per epoch, ranks split each step."""
from __future__ import annotations

import numpy as np
import pytest

from ray_finetune.spec import parse_duration
from ray_finetune.train.plan import EMPTY_ROW, make_plan
from ray_finetune.train.schedule import lr_factor, warmup_steps


def test_warmup_is_two_percent_then_linear_decay_to_zero():
    total = 500
    assert warmup_steps(total) == 10
    factors = [lr_factor(s, total) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(1 / 490) and lr_factor(total, total) == 0.0


@pytest.mark.parametrize("duration, steps", [("3ep", 3 * 9), ("7ba", 7), ("2000tok", 2), ("1_000_000tok", 750)])
def test_durations_become_steps(duration, steps):
    plan = make_plan(rows=70, tokens=12_000, duration=parse_duration(duration), world_size=1, seed=0)
    assert plan.global_batch_rows == 8 and plan.steps_per_epoch == 9
    assert plan.total_steps == steps


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


def test_batch_size_does_not_depend_on_the_number_of_workers_when_data_allows():
    sizes = {make_plan(rows=64, tokens=1, duration=parse_duration("1ep"), world_size=w, seed=0).global_batch_rows
             for w in (1, 2, 4, 8)}
    assert sizes == {8}


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
