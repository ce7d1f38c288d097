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

    from eventstore.store import ReadOnlyQueryError
    from actors.event_sink import event_store

    cluster.connect()
    try:
        columns, rows = ray.get(event_store().sql.remote(query))
    except ray.exceptions.RayTaskError as error:
        cause = error.cause
        if isinstance(cause, ReadOnlyQueryError):
            raise ValidationError("query", str(cause), expected="a single SELECT statement") from None
        raise ValidationError("query", str(cause).strip().splitlines()[-1], expected="valid DuckDB SQL") from None
    return pd.DataFrame.from_records(rows, columns=columns)
