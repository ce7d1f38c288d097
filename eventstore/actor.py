"""The event-store actor: the only writer of events.duckdb. Detached and named, one per cluster."""
from __future__ import annotations

from typing import Any

import ray

import time

from eventstore.replay import RunProjection, RunState
from eventstore.schema import Event, NewEvent
from eventstore.store import EventStore

ACTOR_NAME = "ray_finetune_event_store"


# Restarted if its process dies (it reopens the file; DuckDB replays its WAL); calls are retried then, and the
# idempotency key of each event makes a retried append a no-op.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class EventStoreActor:
    def __init__(self, path: str) -> None:
        self._store = EventStore(path)
        started = time.perf_counter()
        self._runs = RunProjection(self._store.iter_events())
        self.cold_replay_s = time.perf_counter() - started

    def append(self, new_events: list[NewEvent]) -> list[Event]:
        appended = self._store.append(new_events)
        self._runs.apply_all(appended)
        return appended

    def events(self, run_name: str | None = None, after_seq: int = 0, types: list[str] | None = None,
               limit: int | None = None) -> list[Event]:
        return self._store.events(run_name=run_name, after_seq=after_seq, types=types, limit=limit)

    def run_state(self, run_name: str) -> RunState | None:
        return self._runs.states.get(run_name)

    def run_states(self) -> list[RunState]:
        return list(self._runs.states.values())

    def stats(self) -> dict[str, Any]:
        return {"runs": len(self._runs.states), "last_seq": self._runs.last_seq, "cold_replay_s": self.cold_replay_s}

    def sql(self, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        return self._store.sql(query)


# The control plane stays on the head node: the log is a file on the head's disk, and a worker node may vanish.
ON_HEAD_NODE = {"node:__internal_head__": 0.001}


def get_or_create(path: str) -> "ray.actor.ActorHandle":
    return EventStoreActor.options(name=ACTOR_NAME, get_if_exists=True, lifetime="detached",
                                   resources=ON_HEAD_NODE).remote(path)


def append_one(store: "ray.actor.ActorHandle", new_event: NewEvent) -> Event:
    """Append and wait for the acknowledgement (the event is durable when this returns)."""
    return ray.get(store.append.remote([new_event]))[0]
