"""Checkpoint layout (SPEC §5) and the atomic steps that make a torn checkpoint impossible to load.

    <save_folder>/<run_name>/checkpoints/ep{E}-ba{B}/       DeepSpeed state + model/ (HF safetensors) + trainer_state.json
    <save_folder>/<run_name>/checkpoints/latest-sharded-rank0.symlink   names the newest complete checkpoint

A checkpoint is written under a temporary name and renamed into place when complete; the pointer file is
replaced atomically only afterwards.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ray_finetune.errors import ValidationError

POINTER_NAME = "latest-sharded-rank0.symlink"
WEIGHTS_DIR = "model"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^ep(\d+)-ba(\d+)$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ep{epoch}-ba{step}"


def checkpoints_dir(save_folder: str | Path, run_name: str) -> Path:
    return Path(save_folder) / run_name / "checkpoints"


def staging_name(name: str) -> str:
    return f".tmp-{name}"


def publish(directory: Path, name: str) -> Path:
    """Rename a finished staging folder into place, then point the pointer file at it."""
    final = directory / name
    (directory / staging_name(name)).rename(final)
    pointer = directory / POINTER_NAME
    temporary = directory / f".{POINTER_NAME}.tmp"
    temporary.write_text(name + "\n")
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, pointer)
    return final


def write_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def weights_folder(parameter: str, path: str | Path) -> Path:
    """The HF weights folder inside a checkpoint given as a folder, a pointer file, or a folder holding them."""
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    candidate = Path(text).expanduser()
    if candidate.name == POINTER_NAME:
        if not candidate.is_file():
            raise ValidationError(parameter, f"pointer file {text!r} does not exist",
                                  expected="the latest-sharded-rank0.symlink of a run that saved a checkpoint")
        candidate = candidate.parent / candidate.read_text().strip()
    if not candidate.is_dir():
        raise ValidationError(parameter, f"{text!r} is not a checkpoint folder",
                              expected=".../checkpoints/ep{E}-ba{B} or .../latest-sharded-rank0.symlink")
    for folder in (candidate / WEIGHTS_DIR, candidate):
        if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
            return folder
    raise ValidationError(parameter, f"{text!r} holds no consolidated weights (config.json + *.safetensors)",
                          expected="a complete checkpoint written by ray_finetune")


def parse_name(name: str) -> tuple[int, int] | None:
    match = _NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None
