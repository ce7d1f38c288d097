"""The DeepSpeed trainer group on CPU: 2 workers (one gloo group, ZeRO-2) give the same losses as 1."""
from __future__ import annotations

import pytest

from trainer_helpers import TWO_ROW_BATCHES, packed_chat_run, train_with

pytestmark = pytest.mark.cluster


def test_two_cpu_workers_give_the_same_losses_as_one(cluster, tiny_model, tmp_path):
    rows, stats, spec = packed_chat_run(str(tiny_model), tmp_path, TWO_ROW_BATCHES)
    one, plan_one, _ = train_with(1, rows, stats, spec, cluster, tmp_path)
    two, plan_two, _ = train_with(2, rows, stats, spec, cluster, tmp_path)
    assert plan_one.global_batch_rows == plan_two.global_batch_rows >= 2
    assert plan_two.gradient_accumulation_steps * 2 == plan_one.gradient_accumulation_steps
    assert len(one) == len(two) == plan_one.total_steps
    assert one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-4)


def test_a_training_error_is_not_hidden_by_a_failure_to_write_the_last_events():
    from actors.trainer_group import train_reporting

    class Unreachable:
        closed = 0

        def close(self) -> None:
            self.closed += 1
            raise ConnectionError("MLflow is unreachable")

    def diverged():
        raise FloatingPointError("loss is nan at step 7")

    reporter = Unreachable()
    with pytest.raises(FloatingPointError, match="step 7"):
        train_reporting(diverged, reporter)
    assert reporter.closed == 1                      # the last events were still attempted
    with pytest.raises(ConnectionError):             # after a good training, a failure to write them is the error
        train_reporting(lambda: "done", reporter)
