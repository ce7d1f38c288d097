"""Messages between actors: small, immutable, versioned pydantic models (never ad-hoc dicts)."""
from __future__ import annotations

import math
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field

from ray_finetune.spec import RunSpec
from ray_finetune.tracking import now_ms
from ray_finetune.train.plan import TrainingPlan


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    version: int = 1


class RunContext(Message):
    """Who a piece of work belongs to; every actor of a run receives it."""

    run_name: str
    spec: RunSpec
    mlflow_run_id: str
    save_folder: str


class PackRequest(Message):
    run: RunContext
    # Names this request to the shared data packer, so that a cancel can abandon it (and nothing else).
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)


class PackedData(Message):
    # Locations (storage.py): the path of a shared folder, or the object-store URL each node pulls
    train_rows_path: str
    train_stats: dict[str, Any]
    eval_rows_path: str | None = None
    eval_stats: dict[str, Any] | None = None


class TrainRequest(Message):
    run: RunContext
    data: PackedData
    plan: TrainingPlan
    init_weights_path: str | None = None
    resume_from: str | None = None     # a complete checkpoint of this run, after an interruption
    attempt: int = 1


class TrainResult(Message):
    final_checkpoint: str | None
    steps: int
    stopped: bool = False


class StopRequest(Message):
    save_checkpoint: bool = False


class EvaluationResult(Message):
    """What the trainers evaluated at a checkpoint (train/evaluation.py); the payload of its EVALUATED event."""
    step: int
    eval_loss: float | None = None     # None when the run has no eval data
    token_accuracy: float | None = None
    generations: list[dict[str, str]] = []

    @computed_field   # type: ignore[prop-decorator]
    @property
    def eval_perplexity(self) -> float | None:
        return None if self.eval_loss is None else math.exp(min(self.eval_loss, 50.0))


class EvaluateRequest(Message):
    """An evaluation to record."""
    run: RunContext
    result: EvaluationResult
    # The key of its EVALUATED event and the time of its metrics: a call that Ray runs again on a restarted
    # evaluator appends the event once and adds no metric twice.
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    time_ms: int = Field(default_factory=now_ms)


class RegisterRequest(Message):
    run: RunContext
    final_checkpoint: str


class Registration(Message):
    model_name: str
    model_version: str
    final_model_path: str
    memory_wait_s: float = 0.0   # waiting for other registrations' models to leave the head's memory
