"""The MLflow tracking store as the scheduler uses it: which stores are servers to check for an answer, and calls
that give up at once, saying why, when such a server does not answer."""
from __future__ import annotations

import dataclasses

import pytest

from ray_finetune import settings, tracking
from ray_finetune.errors import ConfigError


@pytest.mark.parametrize("uri, address", [
    ("http://127.0.0.1:5000", ("127.0.0.1", 5000)), ("https://mlflow.example.com", ("mlflow.example.com", 443)),
    ("postgresql+psycopg2://u:p@db.internal/mlflow", ("db.internal", 5432)),
    ("sqlite:////home/me/mlflow.db", None), ("file:///tmp/mlruns", None), ("/tmp/mlruns", None)])
def test_only_tracking_stores_reached_over_the_network_are_checked_for_an_answer(uri, address):
    assert tracking.server_address(uri) == address


def test_a_run_status_flag_for_a_tracking_server_that_is_down_is_given_up_at_once():
    """The scheduler sets an MLflow run's status when a run ends, is cancelled or resumed, holding the one MLflow
    lock that creates also take: against a server that is down it gives up at once, saying why (MLflow would retry
    for minutes while cancels and creates waited)."""
    down = dataclasses.replace(settings.load(), tracking_uri="http://127.0.0.1:9")
    for flag in (lambda: tracking.end_runs(down, ["0123abcd"], "KILLED"), lambda: tracking.reopen_run(down, "0123abcd")):
        with pytest.raises(ConfigError, match="the MLflow tracking store at 127.0.0.1:9 .* does not answer"):
            flag()
