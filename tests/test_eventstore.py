"""The event store: gap-free seq, idempotent appends, durability across reopen, read-only SQL."""
from __future__ import annotations

import pytest

from eventstore.replay import replay
from eventstore.schema import EventType, NewEvent
from eventstore.store import EventStore, QueryError, ReadOnlyQueryError


def new(run: str, kind: EventType, key: str | None = None, **payload) -> NewEvent:
    return NewEvent(run_name=run, type=kind, actor="test", message=kind.value.lower(), payload=payload,
                    idempotency_key=key)


def test_seq_is_gap_free_and_survives_reopen(tmp_path):
    path = tmp_path / "events.duckdb"
    store = EventStore(path)
    store.append([new("a", EventType.CREATED, spec={"model": "m"}), new("a", EventType.QUEUED)])
    store.append([new("b", EventType.CREATED)])
    store.close()
    reopened = EventStore(path)
    reopened.append([new("a", EventType.STARTED)])
    assert [e.seq for e in reopened.events()] == [1, 2, 3, 4]
    assert [e.type for e in reopened.events(run_name="a")] == ["CREATED", "QUEUED", "STARTED"]


def test_a_message_delivered_twice_appends_once(tmp_path):
    store = EventStore(tmp_path / "events.duckdb")
    first = store.append([new("a", EventType.CREATED, key="create-a")])
    again = store.append([new("a", EventType.CREATED, key="create-a")])
    assert first[0].seq == again[0].seq
    assert len(store.events()) == 1


def test_a_failed_batch_appends_nothing(tmp_path):
    store = EventStore(tmp_path / "events.duckdb")
    store.append([new("a", EventType.CREATED)])
    with pytest.raises(Exception):
        store.append([new("a", EventType.QUEUED), {"not": "an event"}])  # type: ignore[list-item]
    store.append([new("a", EventType.STARTED)])
    assert [e.seq for e in store.events()] == [1, 2]


@pytest.mark.parametrize("query", [
    "INSERT INTO events VALUES (99, 'x', 'CREATED', now(), 'me', '', '{}', 1, NULL)",
    "DELETE FROM events",
    "DROP TABLE events",
    "UPDATE events SET type = 'COMPLETED'",
    "COPY events TO '/tmp/stolen.csv'",
    "ATTACH '/tmp/other.duckdb' AS other",
    "CREATE TABLE mine AS SELECT 1",
    "SELECT 1; DELETE FROM events",
    "PRAGMA database_list",
])
def test_sql_refuses_anything_but_reading(tmp_path, query):
    store = EventStore(tmp_path / "events.duckdb")
    store.append([new("a", EventType.CREATED)])
    with pytest.raises(ReadOnlyQueryError):
        store.sql(query)
    assert len(store.events()) == 1


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM 'https://example.com/x.parquet'",
])
def test_sql_cannot_read_files_or_the_network(tmp_path, query):
    store = EventStore(tmp_path / "events.duckdb")
    with pytest.raises(QueryError):
        store.sql(query)


def test_sql_reads_events_and_the_runs_view(tmp_path):
    store = EventStore(tmp_path / "events.duckdb")
    store.append([new("a", EventType.CREATED, spec={"model": "tiny"}), new("a", EventType.QUEUED),
                  new("a", EventType.STARTED), new("a", EventType.FAILED_EXCEPTION), new("a", EventType.FAILED)])
    columns, rows = store.sql("SELECT type, count(*) FROM events GROUP BY type ORDER BY type")
    assert columns == ["type", "count_star()"] and len(rows) == 5
    columns, rows = store.sql("SELECT run_name, status, details, model FROM runs")
    assert rows == [("a", "FAILED", "failed_exception", "tiny")]
    _, rows = store.sql("SELECT DISTINCT type FROM run_events ORDER BY type")
    assert ("QUEUED",) not in rows
    assert replay(store.events())["a"].status == "FAILED"


def test_the_projection_equals_a_full_replay_and_ignores_duplicates(tmp_path):
    from eventstore.replay import RunProjection

    store = EventStore(tmp_path / "events.duckdb")
    projection = RunProjection(store.iter_events())
    for i in range(30):
        appended = store.append([new(f"r{i % 4}", kind, key=f"{i}-{kind.value}")
                                 for kind in (EventType.CREATED, EventType.QUEUED, EventType.STARTED)])
        projection.apply_all(appended)
        projection.apply_all(store.append([new(f"r{i % 4}", EventType.CREATED, key=f"{i}-CREATED")]))  # redelivery
    assert projection.states == replay(store.events())
    assert RunProjection(store.iter_events(batch=7)).states == projection.states
