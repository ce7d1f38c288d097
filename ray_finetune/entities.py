"""What users hold: TrainingRun, TrainingEvent, RunStatus, and lists that print as tables (SPEC §4)."""
from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Callable, Generic, Iterable, TypeVar

from eventstore.replay import RunState
from eventstore.schema import TERMINAL_STATUSES, Event

T = TypeVar("T")


class RunStatus(Enum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    TERMINATING = "TERMINATING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    UNKNOWN = "UNKNOWN"

    @property
    def display_name(self) -> str:
        return self.value.capitalize()

    def is_terminal(self) -> bool:
        return self.value in TERMINAL_STATUSES

    def __str__(self) -> str:
        return self.value


_TERMINAL_EVENT_TYPES = {"COMPLETED", "FAILED", "STOPPED", "CANCELED"}


@dataclass(frozen=True)
class TrainingEvent:
    type: str
    time: datetime
    message: str
    payload: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def is_terminal_state(self) -> bool:
        return self.type in _TERMINAL_EVENT_TYPES

    @classmethod
    def from_event(cls, event: Event) -> "TrainingEvent":
        return cls(type=event.type, time=event.time, message=event.message, payload=event.payload)


class Table(builtins.list, Generic[T]):
    """A list that prints as a table and converts to pandas."""

    columns: tuple[str, ...] = ()

    def _rows(self) -> builtins.list[dict[str, Any]]:
        return [{c: getattr(item, c) for c in self.columns} for item in self]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self._rows(), columns=builtins.list(self.columns))

    def __str__(self) -> str:
        rows = [[_cell(r[c]) for c in self.columns] for r in self._rows()]
        widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(self.columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return self.to_pandas()._repr_html_()


def _cell(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, Enum):
        return str(value.value)
    text = "" if value is None else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


class EventList(Table[TrainingEvent]):
    columns = ("type", "time", "message")


@dataclass(frozen=True)
class Model:
    name: str
    display_name: str
    max_context_length: int


class ModelList(Table[Model]):
    columns = ("name", "display_name", "max_context_length")


@dataclass
class TrainingRun:
    name: str
    status: RunStatus
    created_by: str | None = None
    model: str | None = None
    save_folder: str | None = None
    train_data_path: str | None = None
    register_to: str | None = None
    submitted_experiment_path: str | None = None
    task_type: str | None = None
    eval_data_path: str | None = None
    eval_prompts: builtins.list[str] = field(default_factory=builtins.list)
    custom_weights_path: str | None = None
    training_duration: str | None = None
    learning_rate: float | None = None
    context_length: int | None = None
    data_prep_cluster_id: str | None = None
    details: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    estimated_end_time: datetime | None = None
    submitted_config: dict[str, Any] = field(default_factory=dict, repr=False)
    events: builtins.list[TrainingEvent] = field(default_factory=builtins.list, repr=False)
    experiment_id: str | None = None
    run_id: str | None = None

    @classmethod
    def from_state(cls, state: RunState, events: Iterable[Event] = ()) -> "TrainingRun":
        spec = state.spec
        return cls(
            name=state.name, status=RunStatus(state.status), created_by=spec.get("created_by"),
            model=spec.get("model"), save_folder=state.save_folder, train_data_path=spec.get("train_data_path"),
            register_to=spec.get("register_to"), submitted_experiment_path=spec.get("experiment_path"),
            task_type=spec.get("task_type"), eval_data_path=spec.get("eval_data_path"),
            eval_prompts=builtins.list(spec.get("eval_prompts") or []),
            custom_weights_path=spec.get("custom_weights_path"), training_duration=spec.get("training_duration"),
            learning_rate=spec.get("learning_rate"), context_length=spec.get("context_length"),
            data_prep_cluster_id=spec.get("data_prep_cluster_id"), details=state.details,
            created_at=state.created_at, started_at=state.started_at, completed_at=state.completed_at,
            estimated_end_time=state.estimated_end_time, submitted_config=dict(spec),
            events=[TrainingEvent.from_event(e) for e in events], experiment_id=state.experiment_id,
            run_id=state.run_id,
        )

    # Methods delegate to the facade, so a TrainingRun is just a handle with a snapshot of state.
    def refresh(self) -> "TrainingRun":
        from ray_finetune import foundation_model

        fresh = foundation_model.get(self.name)
        self.__dict__.update(fresh.__dict__)
        return self

    def cancel(self) -> int:
        from ray_finetune import foundation_model

        return foundation_model.cancel([self.name])

    def resume(self) -> "TrainingRun":
        from ray_finetune import foundation_model

        return foundation_model.resume(self.name)

    def get_events(self, follow: bool = False) -> EventList:
        from ray_finetune import foundation_model

        return foundation_model.get_events(self.name, follow=follow)

    def wait(self, timeout: float | None = None, poll_s: float = 1.0,
             on_event: Callable[[TrainingEvent], None] | None = None) -> "TrainingRun":
        """Block until the run is terminal (or timeout seconds pass: TimeoutError)."""
        from ray_finetune import foundation_model

        for event in foundation_model.follow_events(self.name, timeout=timeout, poll_s=poll_s):
            if on_event is not None:
                on_event(event)
        return self.refresh()


class RunList(Table[TrainingRun]):
    columns = ("name", "status", "model", "created_by", "created_at", "details")

    def __init__(self, items: Iterable[TrainingRun] = (), next_page: Callable[[], "RunList"] | None = None) -> None:
        super().__init__(items)
        self._next_page = next_page

    @property
    def has_next_page(self) -> bool:
        return self._next_page is not None

    def next_page(self) -> "RunList":
        if self._next_page is None:
            return RunList()
        return self._next_page()
