"""Where state lives: RAY_FINETUNE_HOME (event log, MLflow store, caches) and RAY_FINETUNE_STORAGE (artifacts: a
folder every node mounts, or an object-store URL mirrored on each node: see storage.py)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    storage: Path                   # where this node reads and writes storage: the folder, or the URL's mirror
    tracking_uri: str
    trainer_workers: int            # 0: automatic (plan.trainer_world_size)
    max_concurrent_runs: int
    # Ray resources each trainer worker needs besides its CPU/GPU, e.g. {"a100": 1} to keep trainers on one node
    # type of a mixed cluster (tests use a custom resource standing in for GPUs).
    trainer_resources: dict[str, float] = field(default_factory=dict)
    # "auto" (GPUs when the cluster has some), "gpu" (wait for GPU nodes an autoscaler starts) or "cpu": see
    # train/plan.trainer_group_size.
    trainer_device: str = "auto"
    # "auto" (bf16 on GPUs that have it, else fp32: see train/hardware.py), "bf16" or "fp32".
    precision: str = "auto"
    # "auto" (see train/hardware.choose_attention) or a transformers attention implementation.
    attention: str = "auto"
    # "auto" (see train/hardware.zero_stage), "0", "1", "2" or "3".
    zero_stage: str = "auto"
    # "auto" (on GPUs, only when memory requires it: train/memory.py), "on" or "off".
    activation_checkpointing: str = "auto"
    # "off" or "on": torch.compile each decoder layer on GPUs (compiles for a minute or two at the start of a run).
    compile: str = "off"
    # A run whose trainer group the cluster cannot place within this many seconds fails, saying what it waited
    # for (GPU nodes that never start, a cluster too small); 0 waits forever.
    placement_timeout_s: int = 3600
    # How long a cancel waits for a running run to reach its next step boundary before its trainers are killed (a
    # checkpoint being written or uploaded then is waited for as well, whatever it takes: actors/scheduler.py).
    stop_grace_s: int = 60
    # GiB the CPU trainers of a run may take on each node (model state and activations, shared by the node's
    # trainers); 0: what the node has available when the run starts. A run that would need more recomputes
    # activations, or fails saying what it needs (train/memory.py), instead of being killed by the kernel.
    cpu_memory_gb: float = 0.0
    # Tokens a GPU trainer puts through the model at once (rows per micro-batch x context length) at most; 0: the
    # micro-batch that fits and still pays (train/memory.fit_micro_batch). Less leaves GPU memory to others, at a
    # cost in speed only once micro-batches get small.
    micro_batch_tokens: int = 0
    # "auto" (trainers on CPUs preload TCMalloc when their node has it, else keep glibc from returning freed memory:
    # train/allocator.py) or "system" (trainer processes keep the allocator they start with).
    allocator: str = "auto"

    @property
    def event_log_path(self) -> Path:
        return self.home / "events.duckdb"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def storage_location(self) -> str:
        """RAY_FINETUNE_STORAGE as given: the folder, or the URL."""
        from ray_finetune.storage import location_of

        return location_of(self.storage)

    @property
    def packed_data_dir(self) -> Path:
        return self.storage / "packed"

    def as_env(self) -> dict[str, str]:
        """The environment that makes actors on other processes see the same settings."""
        return {
            "RAY_FINETUNE_HOME": str(self.home),
            "RAY_FINETUNE_STORAGE": self.storage_location,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "RAY_FINETUNE_TRAINER_WORKERS": str(self.trainer_workers),
            "RAY_FINETUNE_MAX_CONCURRENT_RUNS": str(self.max_concurrent_runs),
            "RAY_FINETUNE_TRAINER_RESOURCES": json.dumps(self.trainer_resources),
            "RAY_FINETUNE_TRAINER_DEVICE": self.trainer_device,
            "RAY_FINETUNE_PRECISION": self.precision,
            "RAY_FINETUNE_ATTENTION": self.attention,
            "RAY_FINETUNE_ZERO_STAGE": self.zero_stage,
            "RAY_FINETUNE_ACTIVATION_CHECKPOINTING": self.activation_checkpointing,
            "RAY_FINETUNE_COMPILE": self.compile,
            "RAY_FINETUNE_PLACEMENT_TIMEOUT_S": str(self.placement_timeout_s),
            "RAY_FINETUNE_STOP_GRACE_S": str(self.stop_grace_s),
            "RAY_FINETUNE_CPU_MEMORY_GB": str(self.cpu_memory_gb),
            "RAY_FINETUNE_MICRO_BATCH_TOKENS": str(self.micro_batch_tokens),
            "RAY_FINETUNE_ALLOCATOR": self.allocator,
        }


def without_password(value: str) -> str:
    """A setting as it may be shown: the password of a URL in it (user:password@host) hidden."""
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", value)


# RAY_FINETUNE_HOME picks the local head a driver joins (on a remote cluster's driver it is the driver's own machine's):
# never a setting the cluster's runs could take from a driver.
NOT_THE_CLUSTERS = ("RAY_FINETUNE_HOME",)


def set_here_but_not_used(here: Settings, clusters: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, here, the cluster's) of each setting this process's environment sets to something other than what the
    cluster's runs use: its scheduler and trainers read their settings when the cluster started, so a driver that
    sets another storage or tracking store later would otherwise queue runs that silently go elsewhere."""
    mine = here.as_env()
    return [(key, mine[key], clusters.get(key, "")) for key in mine
            if key in os.environ and key not in NOT_THE_CLUSTERS and mine[key] != clusters.get(key)]


def load() -> Settings:
    from ray_finetune.storage import home as home_folder

    home = home_folder()
    storage = _storage_path(os.environ.get("RAY_FINETUNE_STORAGE", "").strip() or str(home / "storage"))
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    return Settings(
        home=home,
        storage=storage,
        tracking_uri=tracking_uri,
        trainer_workers=_count("RAY_FINETUNE_TRAINER_WORKERS", default=0, least=0),
        max_concurrent_runs=_count("RAY_FINETUNE_MAX_CONCURRENT_RUNS", default=1, least=1),
        trainer_resources=_resources(os.environ.get("RAY_FINETUNE_TRAINER_RESOURCES", "")),
        trainer_device=_one_of("RAY_FINETUNE_TRAINER_DEVICE", ("auto", "gpu", "cpu")),
        precision=_one_of("RAY_FINETUNE_PRECISION", PRECISIONS),
        attention=_one_of("RAY_FINETUNE_ATTENTION", ATTENTIONS),
        zero_stage=_one_of("RAY_FINETUNE_ZERO_STAGE", ZERO_STAGES),
        activation_checkpointing=_one_of("RAY_FINETUNE_ACTIVATION_CHECKPOINTING", ("auto", "on", "off")),
        compile=_one_of("RAY_FINETUNE_COMPILE", ("off", "on")),
        placement_timeout_s=_count("RAY_FINETUNE_PLACEMENT_TIMEOUT_S", default=3600, least=0),
        stop_grace_s=_count("RAY_FINETUNE_STOP_GRACE_S", default=60, least=1),
        cpu_memory_gb=_amount("RAY_FINETUNE_CPU_MEMORY_GB"),
        micro_batch_tokens=_count("RAY_FINETUNE_MICRO_BATCH_TOKENS", default=0, least=0),
        allocator=_one_of("RAY_FINETUNE_ALLOCATOR", ("auto", "system")),
    )


PRECISIONS = ("auto", "bf16", "fp32")
# "per_document" is train/attention.DOCUMENT_SDPA (named here without importing transformers)
ATTENTIONS = ("auto", "per_document", "flash_attention_2", "flex_attention", "sdpa", "eager")
ZERO_STAGES = ("auto", "0", "1", "2", "3")


def _storage_path(text: str) -> Path:
    """RAY_FINETUNE_STORAGE as the folder this node works in: the folder itself, or an object-store URL's mirror
    (refused when no installed fsspec implementation handles its scheme, rather than failing at a run's first
    checkpoint)."""
    from ray_finetune import storage
    from ray_finetune.errors import ConfigError

    if storage.is_url(text):
        import fsspec

        scheme = text.partition("://")[0]
        try:
            fsspec.get_filesystem_class(scheme)   # imports it: a package that is missing is named now
        except (ImportError, ValueError) as error:
            raise ConfigError(f"RAY_FINETUNE_STORAGE={text!r}: no installed fsspec implementation handles "
                              f"{scheme}:// ({error}), or use a folder every node mounts") from None
    return storage.local(text)


def _count(variable: str, default: int, least: int) -> int:
    from ray_finetune.errors import ConfigError

    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < least:
        raise ConfigError(f"{variable}={text!r} is not a whole number of at least {least}")
    return int(text)


def _amount(variable: str) -> float:
    from ray_finetune.errors import ConfigError

    text = os.environ.get(variable, "").strip()
    try:
        value = float(text or 0)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{variable}={text!r} is not a number of GiB (0 or more, e.g. 12 or 0.5)")
    return value


def _one_of(variable: str, allowed: tuple[str, ...]) -> str:
    from ray_finetune.errors import ConfigError

    text = os.environ.get(variable, "")
    value = text.strip().lower() or allowed[0]
    if value not in allowed:
        raise ConfigError(f"{variable}={text!r} is not one of {', '.join(allowed)}")
    return value


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
