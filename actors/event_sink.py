"""How actors append their events: through the event-store actor, acknowledged before they go on (or, for the
trainer's per-step events, sent at once and acknowledged in batches)."""
from __future__ import annotations

import functools
import uuid
from typing import Any

import ray

from eventstore.actor import ACTOR_NAME, ON_HEAD_NODE
from eventstore.schema import Event, EventType, NewEvent

NAMESPACE = "ray_finetune"


def event_store() -> "ray.actor.ActorHandle":
    return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)


def one_per_cluster(actor_class: Any, name: str) -> "ray.actor.ActorHandle":
    """The cluster's one actor of this class (named, detached, on the head node), started if it is not running."""
    return actor_class.options(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                               resources=ON_HEAD_NODE).remote()


class EventSink:
    """Appends one actor's events for one run."""

    def __init__(self, actor: str, run_name: str) -> None:
        self.actor, self.run_name = actor, run_name

    @functools.cached_property
    def _store(self) -> "ray.actor.ActorHandle":
        """Looked up on the first append: a sink that only builds events (to append with others') never needs it."""
        return event_store()

    def event(self, kind: EventType, message: str = "", payload: dict[str, Any] | None = None,
              key: str | None = None) -> NewEvent:
        """An event of this actor and run, to append now (emit, submit) or later with others (submit_all)."""
        # Every event carries a unique key, so a delivery that Ray retries (the store actor restarted before it
        # answered) appends once.
        return NewEvent(run_name=self.run_name, type=kind, actor=self.actor, message=message,
                        payload=payload or {}, idempotency_key=key or uuid.uuid4().hex)

    def emit(self, kind: EventType, message: str = "", payload: dict[str, Any] | None = None,
             key: str | None = None) -> Event:
        return ray.get(self.submit(kind, message, payload, key))[0]

    def submit(self, kind: EventType, message: str = "", payload: dict[str, Any] | None = None,
               key: str | None = None) -> "ray.ObjectRef":
        """Append without waiting; the returned reference resolves when the event is durable. The store runs one
        caller's appends in the order they were sent."""
        return self.submit_all([self.event(kind, message, payload, key)])

    def submit_all(self, events: list[NewEvent]) -> "ray.ObjectRef":
        """Append several events, in order, in one message and one transaction of the store, without waiting."""
        return self._store.append.remote(events)

    async def emit_async(self, kind: EventType, message: str = "", payload: dict[str, Any] | None = None,
                         key: str | None = None) -> Event:
        return (await self._store.append.remote([self.event(kind, message, payload, key)]))[0]
