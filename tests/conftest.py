"""Shared fixtures: a tiny model built here, small data files, and one local Ray head for the session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import build_tiny_model, write_chat_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    return write_chat_jsonl(folder / "train.jsonl", 24), write_chat_jsonl(folder / "eval.jsonl", 6)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A local Ray head started the way a user's first create() starts it, with its own home; stopped at the end."""
    home = tmp_path_factory.mktemp("home")
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_FINETUNE_HOME"] = str(home)
    os.environ["RAY_FINETUNE_MAX_CONCURRENT_RUNS"] = "1"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from ray_finetune import cluster as cluster_module

    settings = cluster_module.connect()
    yield settings
    cluster_module.down()
