"""Messages between actors: small, immutable, versioned pydantic models (never ad-hoc dicts)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from ray_finetune.spec import RunSpec
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


class PackedData(Message):
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


class EvaluateRequest(Message):
    """What the trainers evaluated at `step`, to be recorded."""
    run: RunContext
    step: int
    epoch: int
    eval_loss: float | None = None     # None when the run has no eval data
    token_accuracy: float | None = None
    generations: list[dict[str, str]] = []


class EvaluationResult(Message):
    step: int
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    token_accuracy: float | None = None
    generations: list[dict[str, str]] = []


class RegisterRequest(Message):
    run: RunContext
    final_checkpoint: str


class Registration(Message):
    model_name: str
    model_version: str
    final_model_path: str
