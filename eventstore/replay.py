"""Replay: a run's state is a fold over its events. Pure functions, no I/O, no clock.

The scheduler rebuilds its queue with this after a restart; the driver derives status, details,
timestamps and checkpoints with it. Nothing else stores run state.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Iterable

from eventstore.schema import (
    PENDING, STATUS_AFTER_EVENT, TERMINAL_STATUSES, UNKNOWN, Event, EventType,
)


@dataclass(frozen=True)
class CheckpointRecord:
    path: str
    epoch: int
    step: int
    time: datetime


@dataclass(frozen=True)
class RunState:
    name: str
    status: str = UNKNOWN
    spec: dict[str, Any] = field(default_factory=dict)
    details: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    estimated_end_time: datetime | None = None
    experiment_id: str | None = None
    run_id: str | None = None
    save_folder: str | None = None
    checkpoints: tuple[CheckpointRecord, ...] = ()
    progress: dict[str, Any] = field(default_factory=dict)
    registered_model: dict[str, Any] | None = None
    attempts: int = 0
    interruptions: tuple[str, ...] = ()
    deleted: bool = False
    last_seq: int = 0

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def apply(state: RunState, event: Event) -> RunState:
    """The state after one more event. Terminal statuses are final until the run is resumed; everything else is
    last-writer-wins."""
    changes: dict[str, Any] = {"last_seq": event.seq}
    kind = event.type
    new_life = kind == EventType.RESUMED.value
    if new_life:   # what ended the last life no longer describes the run
        state = replace(state, details=None, completed_at=None, attempts=0, interruptions=())
    next_status = STATUS_AFTER_EVENT.get(kind)
    if next_status is not None and (new_life or not state.is_terminal):
        changes["status"] = next_status
        if next_status in TERMINAL_STATUSES:
            changes["completed_at"] = event.time
    if kind == EventType.CREATED.value:
        changes.update(
            spec=event.payload.get("spec", {}),
            created_at=event.time,
            experiment_id=event.payload.get("experiment_id"),
            run_id=event.payload.get("run_id"),
            save_folder=event.payload.get("save_folder"),
        )
        if state.status == UNKNOWN:
            changes["status"] = PENDING
    elif kind == EventType.STARTED.value:
        changes["attempts"] = state.attempts + 1
        if state.started_at is None:
            changes["started_at"] = event.time
    elif kind == EventType.TRAIN_UPDATED.value:
        changes["progress"] = dict(event.payload)
        if event.payload.get("estimated_end_time"):
            changes["estimated_end_time"] = datetime.fromisoformat(event.payload["estimated_end_time"])
    elif kind == EventType.CHECKPOINT_SAVED.value:
        record = CheckpointRecord(
            path=event.payload["path"], epoch=int(event.payload["epoch"]), step=int(event.payload["step"]),
            time=event.time,
        )
        changes["checkpoints"] = state.checkpoints + (record,)
    elif kind == EventType.CHECKPOINT_REMOVED.value:
        changes["checkpoints"] = tuple(c for c in state.checkpoints if c.path != event.payload["path"])
    elif kind in (EventType.FAILED_EXCEPTION.value, EventType.CANCELED.value) and not state.is_terminal:
        changes["details"] = event.message
    elif kind == EventType.REQUEUED.value:
        changes["interruptions"] = state.interruptions + (str(event.payload.get("reason", event.message)),)
    elif kind == EventType.REGISTERED.value:
        changes["registered_model"] = dict(event.payload)
    elif kind == EventType.DELETED.value:
        changes["deleted"] = True
    return replace(state, **changes)


def replay(events: Iterable[Event]) -> dict[str, RunState]:
    """All runs in the log, in creation order."""
    states: dict[str, RunState] = {}
    for event in events:
        states[event.run_name] = apply(states.get(event.run_name) or RunState(name=event.run_name), event)
    return states


class RunProjection:
    """The run states kept current as events are appended (so reads never replay the log). Rebuilt from the log
    on start; events are applied at most once, in seq order."""

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self.states: dict[str, RunState] = {}
        self.last_seq = 0
        self.apply_all(events)

    def apply_all(self, events: Iterable[Event]) -> None:
        for event in events:
            if event.seq <= self.last_seq:
                continue   # a duplicate delivery, already applied
            previous = self.states.get(event.run_name) or RunState(name=event.run_name)
            self.states[event.run_name] = apply(previous, event)
            self.last_seq = event.seq
