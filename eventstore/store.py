"""The DuckDB event store: append (the only write), read, and read-only SQL for users.

One process owns the file (DuckDB allows one writer); in a cluster that process is the event-store actor.
`seq` is assigned here, in order, with no gaps: appends are serialized by the owning actor.
"""
from __future__ import annotations

import json
from datetime import timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import duckdb

from eventstore.schema import (
    STATUS_AFTER_EVENT, TERMINAL_STATUSES, USER_FACING_TYPES, Event, EventType, NewEvent, utc_now,
)

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT PRIMARY KEY,
    run_name VARCHAR NOT NULL,
    type VARCHAR NOT NULL,
    time TIMESTAMP NOT NULL,          -- UTC
    actor VARCHAR NOT NULL,
    message VARCHAR NOT NULL,
    payload JSON NOT NULL,
    version INTEGER NOT NULL,
    idempotency_key VARCHAR UNIQUE
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_name, seq);
CREATE OR REPLACE TABLE event_status (type VARCHAR PRIMARY KEY, status VARCHAR NOT NULL, terminal BOOLEAN NOT NULL);
CREATE OR REPLACE TABLE user_facing_types (type VARCHAR PRIMARY KEY);
CREATE OR REPLACE VIEW run_events AS
    SELECT seq, run_name, type, time, actor, message, payload FROM events
    WHERE type IN (SELECT type FROM user_facing_types);
CREATE OR REPLACE VIEW runs AS
WITH resumed AS (   -- a run's current life begins at its last RESUMED event, or at its beginning
    SELECT run_name, max(seq) AS seq FROM events WHERE type = 'RESUMED' GROUP BY run_name
),
life AS (
    SELECT e.* FROM events e LEFT JOIN resumed r ON e.run_name = r.run_name WHERE e.seq >= coalesce(r.seq, 0)
),
status_events AS (
    SELECT e.run_name, e.seq, e.time, s.status, s.terminal
    FROM life e JOIN event_status s ON e.type = s.type
),
first_terminal AS (
    SELECT run_name, min(seq) AS seq FROM status_events WHERE terminal GROUP BY run_name
),
last_status AS (
    SELECT run_name, max(seq) AS seq FROM status_events GROUP BY run_name
),
current AS (
    SELECT l.run_name, coalesce(t.seq, l.seq) AS seq, t.seq IS NOT NULL AS terminal
    FROM last_status l LEFT JOIN first_terminal t ON l.run_name = t.run_name
),
reasons AS (
    SELECT run_name, arg_max(message, seq) AS details FROM life e
    WHERE type IN ('FAILED_EXCEPTION', 'CANCELED')
      AND seq <= coalesce((SELECT seq FROM first_terminal f WHERE f.run_name = e.run_name), seq)
    GROUP BY run_name
)
SELECT
    c.run_name,
    se.status,
    r.details,
    created.time AS created_at,
    (SELECT min(time) FROM events s WHERE s.run_name = c.run_name AND s.type = 'STARTED') AS started_at,
    CASE WHEN c.terminal THEN se.time END AS completed_at,
    created.payload ->> '$.spec.model' AS model,
    created.payload ->> '$.spec.task_type' AS task_type,
    created.payload ->> '$.spec.created_by' AS created_by,
    created.payload ->> '$.spec.register_to' AS register_to,
    created.payload ->> '$.experiment_id' AS experiment_id,
    created.payload ->> '$.run_id' AS mlflow_run_id
FROM current c
JOIN status_events se ON se.seq = c.seq
LEFT JOIN events created ON created.run_name = c.run_name AND created.type = 'CREATED'
LEFT JOIN reasons r ON r.run_name = c.run_name
WHERE c.run_name NOT IN (SELECT run_name FROM events WHERE type = 'DELETED');
"""

# Statement types a user's query may contain: reading only.
_READ_ONLY_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class QueryError(ValueError):
    """A user's SQL could not run; the message says why in one line."""


class ReadOnlyQueryError(QueryError):
    """A user's SQL tried to do more than read the log."""


class EventStore:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = duckdb.connect(self.path)
        self._conn.execute(SCHEMA_SQL)
        self._conn.executemany(
            "INSERT INTO event_status VALUES (?, ?, ?)",
            [(t, s, s in TERMINAL_STATUSES) for t, s in STATUS_AFTER_EVENT.items()],
        )
        self._conn.executemany("INSERT INTO user_facing_types VALUES (?)", [(t,) for t in sorted(USER_FACING_TYPES)])
        # From here on this connection cannot touch any file but its own database, whatever a query asks.
        self._conn.execute("SET enable_external_access = false")
        self._next_seq = self._conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM events").fetchone()[0]

    def append(self, new_events: Iterable[NewEvent]) -> list[Event]:
        """Append events atomically, in order; durable when this returns. An event whose idempotency key is already
        in the log (or earlier in the same batch) is not appended again: the stored one is returned in its place."""
        batch = list(new_events)
        known = self._by_keys([n.idempotency_key for n in batch if n.idempotency_key is not None])
        appended: list[Event] = []
        rows: list[tuple[Any, ...]] = []
        next_seq = self._next_seq
        now = utc_now()
        for new in batch:
            if new.idempotency_key is not None and new.idempotency_key in known:
                appended.append(known[new.idempotency_key])
                continue
            event = Event(version=new.version, seq=next_seq, run_name=new.run_name, type=EventType(new.type).value,
                          time=now, actor=new.actor, message=new.message, payload=new.payload)
            rows.append((event.seq, event.run_name, event.type, now.replace(tzinfo=None), event.actor, event.message,
                         json.dumps(event.payload, default=str), event.version, new.idempotency_key))
            if new.idempotency_key is not None:
                known[new.idempotency_key] = event
            appended.append(event)
            next_seq += 1
        self._conn.execute("BEGIN TRANSACTION")
        try:
            self._insert(rows)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._next_seq = next_seq
        return appended

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        if len(rows) <= 32:
            for row in rows:
                self._conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", list(row))
            return
        import pyarrow as pa

        columns = list(zip(*rows))
        incoming = pa.table({
            "seq": pa.array(columns[0], pa.int64()), "run_name": pa.array(columns[1], pa.string()),
            "type": pa.array(columns[2], pa.string()), "time": pa.array(columns[3], pa.timestamp("us")),
            "actor": pa.array(columns[4], pa.string()), "message": pa.array(columns[5], pa.string()),
            "payload": pa.array(columns[6], pa.string()), "version": pa.array(columns[7], pa.int32()),
            "idempotency_key": pa.array(columns[8], pa.string()),
        })
        self._conn.register("incoming_events", incoming)
        try:
            self._conn.execute("INSERT INTO events SELECT * FROM incoming_events")
        finally:
            self._conn.unregister("incoming_events")

    def _by_keys(self, keys: list[str]) -> dict[str, Event]:
        """Stored events with these idempotency keys (an index lookup per key)."""
        found: dict[str, Event] = {}
        for start in range(0, len(keys), 256):
            chunk = keys[start:start + 256]
            rows = self._conn.execute(
                "SELECT seq, run_name, type, time, actor, message, payload, version, idempotency_key FROM events "
                f"WHERE idempotency_key IN ({', '.join('?' for _ in chunk)})", chunk).fetchall()
            for r in rows:
                found[r[8]] = self._event(r)
        return found

    def events(
        self, run_name: str | None = None, after_seq: int = 0, types: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        clauses, params = ["seq > ?"], [after_seq]
        if run_name is not None:
            clauses.append("run_name = ?")
            params.append(run_name)
        if types is not None:
            types = list(types)
            clauses.append(f"type IN ({', '.join('?' for _ in types)})")
            params.extend(types)
        tail = f" LIMIT {int(limit)}" if limit is not None else ""
        return self._select("WHERE " + " AND ".join(clauses) + " ORDER BY seq" + tail, params)

    def iter_events(self, batch: int = 50_000) -> Iterator[Event]:
        """Every event in seq order, read in bounded batches (a cold replay of a large log)."""
        after = 0
        while True:
            chunk = self.events(after_seq=after, limit=batch)
            if not chunk:
                return
            yield from chunk
            after = chunk[-1].seq

    def sql(self, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one read-only statement; returns (column names, rows)."""
        try:
            statements = duckdb.extract_statements(query)
        except duckdb.Error as error:
            raise QueryError(str(error).strip().splitlines()[0]) from None
        if len(statements) != 1:
            raise ReadOnlyQueryError(f"expected exactly one SQL statement, got {len(statements)}")
        if statements[0].type not in _READ_ONLY_STATEMENTS:
            raise ReadOnlyQueryError(
                f"the event log is read-only: {statements[0].type.name} statements are not allowed; use SELECT"
            )
        cursor = self._conn.cursor()
        try:
            result = cursor.execute(query)
            columns = [d[0] for d in result.description]
            return columns, result.fetchall()
        except duckdb.Error as error:
            raise QueryError(str(error).strip().splitlines()[0]) from None
        finally:
            cursor.close()

    def close(self) -> None:
        self._conn.close()

    def _select(self, where: str, params: list[Any]) -> list[Event]:
        rows = self._conn.execute(
            "SELECT seq, run_name, type, time, actor, message, payload, version FROM events " + where, params
        ).fetchall()
        return [self._event(r) for r in rows]

    @staticmethod
    def _event(r: tuple[Any, ...]) -> Event:
        return Event(seq=r[0], run_name=r[1], type=r[2], time=r[3].replace(tzinfo=timezone.utc), actor=r[4],
                     message=r[5], payload=json.loads(r[6]), version=r[7])
