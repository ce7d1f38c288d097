"""Read-only SQL over the event log (SPEC §7): `ray_finetune.events.sql("SELECT ...")`.

Tables and views: `events` (every event), `run_events` (the user-facing ones), `runs` (one row per run, status
derived from the events), `event_status` (which event implies which status).
"""
from __future__ import annotations

from typing import Any

import ray

from ray_finetune import cluster
from ray_finetune.errors import ValidationError


def sql(query: str) -> Any:
    """Run one SELECT over the log; returns a pandas DataFrame. Writes, COPY, ATTACH and file access are refused."""
    import pandas as pd

    from actors.event_sink import event_store
    from eventstore.store import QueryError

    cluster.connect()
    try:
        columns, rows = ray.get(event_store().sql.remote(query))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, QueryError):
            raise ValidationError("query", error.cause.args[0], expected="one read-only SELECT over the tables "
                                  "events, run_events, runs") from None
        raise
    return pd.DataFrame.from_records(rows, columns=columns)
