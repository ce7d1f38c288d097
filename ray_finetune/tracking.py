"""MLflow: one experiment per run path, the run's params and metrics, eval generations, and the registered model.

The local store lives under the home (sqlite) unless MLFLOW_TRACKING_URI is set. A run's artifact root is on
RAY_FINETUNE_STORAGE, and it is the run's save_folder: checkpoints are written straight into it (an object-store
URL when the storage is one: MLflow uploads its own artifacts there, and storage.py mirrors the checkpoints).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray_finetune import storage
from ray_finetune.errors import ConfigError
from ray_finetune.settings import Settings
from ray_finetune.ports import why_unreachable

# Registering and serving a model needs these in the model's environment; listing them avoids MLflow's slow
# requirement inference (it imports the model in a subprocess).
SERVING_REQUIREMENTS = ["torch", "transformers", "accelerate", "safetensors", "tokenizers"]


@dataclass(frozen=True)
class TrackedRun:
    experiment_id: str
    run_id: str
    save_folder: str


def client(settings: Settings) -> Any:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    if settings.tracking_uri.startswith("sqlite:///"):
        Path(settings.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


# Tracking stores reached over the network, by the port they listen on unless the URI names one.
SERVER_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
REACH_TIMEOUT_S = 5.0


def server_address(tracking_uri: str) -> tuple[str, int] | None:
    """(host, port) of a tracking store reached over the network; None for a local one (sqlite, a folder)."""
    parsed = urlparse(tracking_uri)
    scheme = parsed.scheme.split("+")[0]   # postgresql+psycopg2://...
    if scheme not in SERVER_PORTS or not parsed.hostname:
        return None
    return parsed.hostname, parsed.port or SERVER_PORTS[scheme]


def ensure_reachable(settings: Settings) -> None:
    """A tracking server that is down would hold a create() for minutes (MLflow retries a refused connection, with
    backoff, for every call) and then end in the HTTP client's traceback: checked first, in seconds. A server that
    answers but fails is left to MLflow's retries."""
    address = server_address(settings.tracking_uri)
    if address is None:
        return
    host, port = address
    reason = why_unreachable(host, port, REACH_TIMEOUT_S)
    if reason:   # named by host and port, not by the URI: it may hold a password
        raise ConfigError(
            f"the MLflow tracking store at {host}:{port} (MLFLOW_TRACKING_URI where the cluster was started) does "
            f"not answer: {reason}. Start it, or set MLFLOW_TRACKING_URI to one that answers, on the head and "
            "every node; unset, runs are tracked in the local store under RAY_FINETUNE_HOME")


def open_store(settings: Settings) -> None:
    """Connect this process to the tracking store ahead of its first write: a process's first connection costs
    seconds (MLflow's imports, the database's schema check), which an actor started early pays while it waits."""
    client(settings).search_experiments(max_results=1)


def experiment_path_for(created_by: str, run_name: str, experiment_path: str | None) -> str:
    return experiment_path or f"/Users/{created_by}/{run_name}"


def start_run(settings: Settings, *, experiment_path: str, run_name: str, params: dict[str, Any]) -> TrackedRun:
    ensure_reachable(settings)
    mlflow = client(settings)
    experiment = mlflow.get_experiment_by_name(experiment_path)
    if experiment is None:
        folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_path.strip("/")) or "default"
        artifacts = settings.storage / "mlflow-artifacts" / folder
        location = storage.location_of(artifacts) if storage.is_mirrored(artifacts) else artifacts.as_uri()
        experiment_id = mlflow.create_experiment(experiment_path, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = mlflow.create_run(experiment_id, run_name=run_name)
    from mlflow.entities import Param

    mlflow.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    return TrackedRun(experiment_id=experiment_id, run_id=run.info.run_id,
                      save_folder=local_artifact_path(run.info.artifact_uri))


def local_artifact_path(uri: str) -> str:
    parsed = urlparse(uri)
    return parsed.path if parsed.scheme in ("", "file") else uri


def now_ms() -> int:
    """A metric's time as MLflow keeps it: milliseconds since the epoch."""
    return int(time.time() * 1000)


def log_metrics(settings: Settings, run_id: str, metrics: dict[str, float], step: int, time_ms: int) -> None:
    log_metric_history(settings, run_id, [(step, time_ms, metrics)])


MLFLOW_BATCH = 1000   # the most metrics MLflow takes in one log_batch


def log_metric_history(settings: Settings, run_id: str, steps: list[tuple[int, int, dict[str, float]]]) -> None:
    """Metrics of many steps, each (step, time_ms, values), in as few writes as MLflow allows. Each step keeps the
    time it was measured at (not the time of the write, which batches several seconds of steps), and writing the
    same metrics again adds nothing: MLflow keeps one of each (key, time, step, value)."""
    from mlflow.entities import Metric

    metrics = [Metric(k, float(v), time_ms, step) for step, time_ms, values in steps for k, v in values.items()]
    for start in range(0, len(metrics), MLFLOW_BATCH):
        client(settings).log_batch(run_id, metrics=metrics[start:start + MLFLOW_BATCH])


def log_generations(settings: Settings, run_id: str, rows: list[dict[str, str]], step: int) -> None:
    client(settings).log_table(run_id, {"prompt": [r["prompt"] for r in rows],
                                        "generation": [r["generation"] for r in rows]},
                               artifact_file=f"eval_generations/step_{step:06d}.json")


def end_runs(settings: Settings, run_ids: list[str], status: str) -> None:
    """The MLflow runs' status flag (secondary: the event log says how a run ended). Checked for a server first,
    once for all of them: a cancel or a create must not wait minutes behind MLflow's retries against one that is
    down, nor seconds per run against one that drops packets."""
    ensure_reachable(settings)
    mlflow = client(settings)
    for run_id in run_ids:
        mlflow.set_terminated(run_id, status=status)


def reopen_run(settings: Settings, run_id: str) -> None:
    """A resumed run's MLflow run is running again (its metrics go on from the step it resumes at); as end_runs."""
    ensure_reachable(settings)
    client(settings).update_run(run_id, status="RUNNING")


def log_and_register_model(settings: Settings, *, run_id: str, model_folder: str, registered_name: str) -> str:
    """Log the HF folder as an MLflow transformers model in the run and register it; returns the version."""
    import mlflow

    from ray_finetune.train.models import load_model, load_tokenizer

    client(settings)
    # Logged from loaded objects: MLflow's log-from-folder path does not understand transformers 5's task table.
    components = {"model": load_model(model_folder), "tokenizer": load_tokenizer(model_folder)}
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model=components, name="model", task="text-generation",
            pip_requirements=SERVING_REQUIREMENTS, registered_model_name=registered_name,
        )
    return str(info.registered_model_version)
