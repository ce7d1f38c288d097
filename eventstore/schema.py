"""Event types, the statuses they imply, and the immutable event records that travel between actors.

The status table here is the single definition of "which event moves a run to which status": the Python
replay folds over it and the SQL `runs` view joins against a copy of it, so the two can never disagree.
"""
from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class EventType(str, Enum):
    # user-facing (SPEC §4)
    CREATED = "CREATED"
    STARTED = "STARTED"
    DATA_VALIDATED = "DATA_VALIDATED"
    MODEL_INITIALIZED = "MODEL_INITIALIZED"
    TRAIN_STARTED = "TRAIN_STARTED"
    TRAIN_UPDATED = "TRAIN_UPDATED"
    CHECKPOINT_SAVED = "CHECKPOINT_SAVED"
    TRAIN_FINISHED = "TRAIN_FINISHED"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"
    FAILED = "FAILED"
    FAILED_EXCEPTION = "FAILED_EXCEPTION"
    REQUEUED = "REQUEUED"
    RESUMED = "RESUMED"         # ours: a user resumed a stopped or failed run (fm.resume)
    DATA_PROGRESS = "DATA_PROGRESS"   # ours: how far tokenizing a large dataset has got (before DATA_VALIDATED)
    # internal (same log, hidden from get_events)
    QUEUED = "QUEUED"
    WAITING_FOR_RESOURCES = "WAITING_FOR_RESOURCES"
    PLACED = "PLACED"
    CANCEL_REQUESTED = "CANCEL_REQUESTED"
    EVALUATED = "EVALUATED"
    CHECKPOINT_REMOVED = "CHECKPOINT_REMOVED"
    REGISTERED = "REGISTERED"
    DELETED = "DELETED"


USER_FACING_TYPES: frozenset[str] = frozenset(
    t.value
    for t in (
        EventType.CREATED, EventType.STARTED, EventType.DATA_VALIDATED, EventType.MODEL_INITIALIZED,
        EventType.TRAIN_STARTED, EventType.TRAIN_UPDATED, EventType.CHECKPOINT_SAVED, EventType.TRAIN_FINISHED,
        EventType.COMPLETED, EventType.CANCELED, EventType.FAILED, EventType.FAILED_EXCEPTION, EventType.REQUEUED,
        EventType.RESUMED, EventType.DATA_PROGRESS,
    )
)

# Run statuses (SPEC §4) as plain strings, so this package needs nothing from ray_finetune.
PENDING, QUEUED, STARTING, RUNNING, TERMINATING = "PENDING", "QUEUED", "STARTING", "RUNNING", "TERMINATING"
COMPLETED, FAILED, STOPPED, UNKNOWN = "COMPLETED", "FAILED", "STOPPED", "UNKNOWN"
TERMINAL_STATUSES: frozenset[str] = frozenset({COMPLETED, FAILED, STOPPED})
RESUMABLE_STATUSES: frozenset[str] = frozenset({FAILED, STOPPED})

# The only place that says which event moves a run to which status. Events not listed leave it unchanged;
# once a run reaches a terminal status no later event changes it -- except RESUMED, which begins a new life of the
# run: status, details, completion time and attempts count from there as if the run had just been queued.
STATUS_AFTER_EVENT: dict[str, str] = {
    EventType.CREATED.value: PENDING,
    EventType.QUEUED.value: QUEUED,
    EventType.REQUEUED.value: QUEUED,
    EventType.RESUMED.value: QUEUED,
    EventType.STARTED.value: STARTING,
    EventType.TRAIN_STARTED.value: RUNNING,
    EventType.TRAIN_FINISHED.value: TERMINATING,
    EventType.COMPLETED.value: COMPLETED,
    EventType.FAILED.value: FAILED,
    EventType.CANCELED.value: STOPPED,
}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class NewEvent(BaseModel):
    """What an actor asks the store to append; the store gives it a seq and a time."""

    model_config = ConfigDict(frozen=True)
    version: int = 1
    run_name: str
    type: EventType
    actor: str
    message: str = ""
    payload: dict[str, Any] = Field(default_factory=dict)
    # An actor that may deliver the same message twice sets this; the store appends it once.
    idempotency_key: str | None = None


class Event(BaseModel):
    """An appended event, exactly as the log holds it."""

    model_config = ConfigDict(frozen=True)
    version: int = 1
    seq: int
    run_name: str
    type: str
    time: datetime
    actor: str
    message: str
    payload: dict[str, Any]
