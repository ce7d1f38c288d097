"""Where state lives: RAY_FINETUNE_HOME (event log, MLflow store, caches) and RAY_FINETUNE_STORAGE (artifacts)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    storage: Path
    tracking_uri: str
    trainer_workers: int
    max_concurrent_runs: int
    # Ray resources each trainer worker needs besides its CPU/GPU, e.g. {"a100": 1} to keep trainers on one node
    # type of a mixed cluster (tests use a custom resource standing in for GPUs).
    trainer_resources: dict[str, float] = field(default_factory=dict)

    @property
    def event_log_path(self) -> Path:
        return self.home / "events.duckdb"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def packed_data_dir(self) -> Path:
        return self.storage / "packed"

    def as_env(self) -> dict[str, str]:
        """The environment that makes actors on other processes see the same settings."""
        return {
            "RAY_FINETUNE_HOME": str(self.home),
            "RAY_FINETUNE_STORAGE": str(self.storage),
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "RAY_FINETUNE_TRAINER_WORKERS": str(self.trainer_workers),
            "RAY_FINETUNE_MAX_CONCURRENT_RUNS": str(self.max_concurrent_runs),
            "RAY_FINETUNE_TRAINER_RESOURCES": json.dumps(self.trainer_resources),
        }


def load() -> Settings:
    home = Path(os.environ.get("RAY_FINETUNE_HOME", "~/.ray_finetune")).expanduser().resolve()
    storage = Path(os.environ.get("RAY_FINETUNE_STORAGE", str(home / "storage"))).expanduser().resolve()
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    return Settings(
        home=home,
        storage=storage,
        tracking_uri=tracking_uri,
        trainer_workers=int(os.environ.get("RAY_FINETUNE_TRAINER_WORKERS", "1")),
        max_concurrent_runs=int(os.environ.get("RAY_FINETUNE_MAX_CONCURRENT_RUNS", "1")),
        trainer_resources=_resources(os.environ.get("RAY_FINETUNE_TRAINER_RESOURCES", "")),
    )


def _resources(text: str) -> dict[str, float]:
    from ray_finetune.errors import ConfigError

    if not text.strip():
        return {}
    try:
        value = json.loads(text)
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
            raise ValueError
    except ValueError:
        raise ConfigError(f"RAY_FINETUNE_TRAINER_RESOURCES={text!r} is not a JSON object of positive numbers, "
                          'e.g. {"accelerator": 1}') from None
    return {str(k): float(v) for k, v in value.items()}
