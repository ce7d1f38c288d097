"""The resolved run specification: parsing of durations, register_to and paths, and every default filled in.

`resolve()` runs in the driver before anything is queued; whatever it returns is what the run will do, and it is
stored whole in the CREATED event's payload.
"""
from __future__ import annotations

import getpass
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from ray_finetune.errors import ValidationError

TaskType = Literal["CHAT_COMPLETION", "INSTRUCTION_FINETUNE", "CONTINUED_PRETRAIN"]
TASK_TYPES: tuple[str, ...] = ("CHAT_COMPLETION", "INSTRUCTION_FINETUNE", "CONTINUED_PRETRAIN")
DurationUnit = Literal["ep", "ba", "tok"]

DEFAULT_LEARNING_RATE = 5e-6
DEFAULT_MAX_CONTEXT_LENGTH = 8192
DEFAULT_SEED = 17
DEFAULT_CHECKPOINT_INTERVAL = "1ep"
DEFAULT_CHECKPOINTS_TO_KEEP = 3

_DURATION = re.compile(r"^\s*(\d[\d_]*)\s*(ep|ba|tok)\s*$")
_IDENTIFIER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


class Duration(BaseModel):
    model_config = ConfigDict(frozen=True)
    value: int
    unit: DurationUnit

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"


def parse_duration(text: str | None) -> Duration:
    """'2ep', '100ba', '1_000_000tok' → Duration. Default (None) is one epoch."""
    if text is None:
        return Duration(value=1, unit="ep")
    match = _DURATION.match(str(text))
    if not match:
        raise ValidationError("training_duration", f"could not parse {text!r}",
                              expected="<int>ep, <int>ba or <int>tok, e.g. '3ep', '500ba', '1_000_000tok'")
    value = int(match.group(1).replace("_", ""))
    if value <= 0:
        raise ValidationError("training_duration", f"{text!r} is not positive", expected="a positive count such as 1ep, 100ba or 1_000_000tok")
    return Duration(value=value, unit=match.group(2))  # type: ignore[arg-type]


def parse_checkpoint_interval(text: str | None) -> Duration:
    """How often to checkpoint: '<int>ep' or '<int>ba' (default every epoch)."""
    interval = parse_duration(text or DEFAULT_CHECKPOINT_INTERVAL)
    if interval.unit == "tok":
        raise ValidationError("checkpoint_interval", f"{text!r} counts tokens", expected="'<int>ep' or '<int>ba'")
    return interval


def parse_learning_rate(value: float | str | None) -> float:
    if value is None:
        return DEFAULT_LEARNING_RATE
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValidationError("learning_rate", f"{value!r} is not a number", expected="a float such as 5e-6") from None
    if not 0 < rate < 1:
        raise ValidationError("learning_rate", f"{rate} is out of range", expected="a value between 0 and 1")
    return rate


class RegisterTo(BaseModel):
    model_config = ConfigDict(frozen=True)
    catalog: str
    schema_name: str
    model_name: str | None

    def full_name(self, run_name: str) -> str:
        return f"{self.catalog}.{self.schema_name}.{self.model_name or run_name}"


def parse_register_to(text: str | None) -> RegisterTo:
    if not text:
        raise ValidationError("register_to", "is required", expected="'catalog.schema' or 'catalog.schema.model_name'")
    parts = str(text).split(".")
    if len(parts) not in (2, 3) or not all(_IDENTIFIER.match(p) for p in parts):
        raise ValidationError("register_to", f"{text!r} is not a two- or three-part name",
                              expected="'catalog.schema' or 'catalog.schema.model_name' "
                                       "(letters, digits, '_' and '-')")
    return RegisterTo(catalog=parts[0], schema_name=parts[1], model_name=parts[2] if len(parts) == 3 else None)


class RunSpec(BaseModel):
    """Everything a run needs, resolved. Versioned because it is stored in the log and replayed later."""

    model_config = ConfigDict(frozen=True)
    version: int = 1
    model: str
    model_path: str
    train_data_path: str
    register_to: str
    task_type: TaskType = "CHAT_COMPLETION"
    experiment_path: str | None = None
    eval_data_path: str | None = None
    eval_prompts: list[str] = []
    custom_weights_path: str | None = None
    training_duration: str = "1ep"
    learning_rate: float = DEFAULT_LEARNING_RATE
    context_length: int
    data_prep_cluster_id: str | None = None
    validate_inputs: bool = True
    created_by: str
    seed: int = DEFAULT_SEED
    checkpoint_interval: str = DEFAULT_CHECKPOINT_INTERVAL
    checkpoints_to_keep: int = DEFAULT_CHECKPOINTS_TO_KEEP

    @property
    def duration(self) -> Duration:
        return parse_duration(self.training_duration)

    @property
    def checkpoint_every(self) -> Duration:
        return parse_checkpoint_interval(self.checkpoint_interval)

    @property
    def destination(self) -> RegisterTo:
        return parse_register_to(self.register_to)


def resolve(
    *,
    model: str,
    train_data_path: str,
    register_to: str,
    experiment_path: str | None = None,
    task_type: str = "CHAT_COMPLETION",
    eval_data_path: str | None = None,
    eval_prompts: list[str] | None = None,
    custom_weights_path: str | None = None,
    training_duration: str | None = None,
    learning_rate: float | str | None = None,
    context_length: int | None = None,
    data_prep_cluster_id: str | None = None,
    validate_inputs: bool = True,
    checkpoint_interval: str | None = None,
    checkpoints_to_keep: int | None = None,
) -> RunSpec:
    """Parse and check every argument of create(); raises ValidationError before anything is queued."""
    from ray_finetune.data import sources, validation
    from ray_finetune.data.spark import check_cluster_id
    from ray_finetune.data.formats import check_tokenizer
    from ray_finetune.train.models import load_tokenizer, resolve_model

    if task_type not in TASK_TYPES:
        raise ValidationError("task_type", f"{task_type!r} is not a task type", expected=" or ".join(TASK_TYPES))
    duration = parse_duration(training_duration)
    rate = parse_learning_rate(learning_rate)
    parse_register_to(register_to)
    prompts = _parse_eval_prompts(eval_prompts)
    interval = parse_checkpoint_interval(checkpoint_interval)
    keep = DEFAULT_CHECKPOINTS_TO_KEEP if checkpoints_to_keep is None else checkpoints_to_keep
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ValidationError("checkpoints_to_keep", f"{checkpoints_to_keep!r} is not a count",
                              expected="a positive integer (the final checkpoint is always kept as well)")
    if not model or not isinstance(model, str):
        raise ValidationError("model", f"{model!r} is not a model name", expected="a Hugging Face id or a local path")
    resolved = resolve_model(model)
    if context_length is None:
        context = min(DEFAULT_MAX_CONTEXT_LENGTH, resolved.max_context_length)
    else:
        if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 16:
            raise ValidationError("context_length", f"{context_length!r} is not a usable length",
                                  expected="an integer of at least 16")
        if context_length > resolved.max_context_length:
            raise ValidationError("context_length", f"{context_length} is longer than {model}'s maximum",
                                  expected=f"at most {resolved.max_context_length}")
        context = context_length
    tokenizer = load_tokenizer(resolved.path)
    check_tokenizer(tokenizer, task_type)
    if not train_data_path:
        raise ValidationError("train_data_path", "is required", expected="a .jsonl file or a folder of .txt files")
    train_data_path, eval_data_path, custom_weights_path = (
        sources.anchored(str(path)) if path else path for path in (train_data_path, eval_data_path, custom_weights_path))
    check_cluster_id(data_prep_cluster_id)
    if validate_inputs:
        validation.check_data("train_data_path", train_data_path, task_type, data_prep_cluster_id, tokenizer)
        if eval_data_path:
            validation.check_data("eval_data_path", eval_data_path, task_type, data_prep_cluster_id, tokenizer)
    if custom_weights_path:
        validation.check_checkpoint("custom_weights_path", custom_weights_path, resolved.path)
    return RunSpec(
        model=model, model_path=str(resolved.path), train_data_path=train_data_path, register_to=register_to,
        task_type=task_type,  # type: ignore[arg-type]
        experiment_path=experiment_path or None,  # the original API's default is ''
        eval_data_path=eval_data_path, eval_prompts=prompts,
        custom_weights_path=custom_weights_path, training_duration=str(duration), learning_rate=rate,
        context_length=context, data_prep_cluster_id=data_prep_cluster_id, validate_inputs=validate_inputs,
        created_by=current_user(), checkpoint_interval=str(interval), checkpoints_to_keep=keep,
    )


def _parse_eval_prompts(prompts: list[str] | None) -> list[str]:
    if prompts is None:
        return []
    if isinstance(prompts, str) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValidationError("eval_prompts", f"{prompts!r} is not a list of prompts",
                              expected="a list of non-empty strings")
    return list(prompts)


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
