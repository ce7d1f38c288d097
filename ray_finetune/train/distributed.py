"""The trainer workers' torch.distributed group: a free port for its rendezvous, and joining it.

Also what a benchmark or test needs to run the training loop in a plain process (a group of one)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

from ray_finetune.ports import free_port

if TYPE_CHECKING:
    import torch


def join_process_group(rank: int, world_size: int, master: tuple[str, int] | None = None) -> None:
    """One group over all ranks: NCCL between GPUs, gloo on CPU. Rank 0 listens at `master` (by default a free
    local port: a group of one). DeepSpeed reads RANK/WORLD_SIZE/LOCAL_RANK; Ray gives each GPU worker its own
    CUDA_VISIBLE_DEVICES, so the local rank is always 0."""
    import torch
    import torch.distributed as dist

    host, port = master or ("127.0.0.1", free_port())
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    prefer_expandable_gpu_memory()
    name_deepspeed_accelerator()
    prepare_deepspeed_ops()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"tcp://{host}:{port}",
                            rank=rank, world_size=world_size)


def prefer_expandable_gpu_memory() -> None:
    """Let PyTorch's GPU allocator grow its segments in place (expandable_segments) unless the operator configured
    it. A trainer first searches for its micro-batch (memory.fit_micro_batch), and a trial that
    runs out of memory leaves the default allocator's fixed-size segments split: every later step then hunts for
    blocks and frees and retries. Measured on an H200 (Llama-1B shape, context 2048, two failed trials): 32.7k
    useful tokens/s by default, 44.3k with this setting, the same peak memory (BENCHMARKS.md). PyTorch reads it
    when the process first uses CUDA, so this runs before that, first thing in a trainer process."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def name_deepspeed_accelerator() -> None:
    """Before DeepSpeed's first import (transformers imports it with its model code): without CUDA it picks the
    CPU anyway, but says so in a WARNING line on every import, which lands in the terminal of anyone who loads a
    model here (a dry run's probe, a GGUF conversion). Naming it is the same choice, silently."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def import_deepspeed() -> None:
    """DeepSpeed imported into a trainer process without MLflow: DeepSpeed's autotuner (unused here) imports MLflow
    whenever it is installed, 1.2 s of every trainer's start on 2 cores, and a trainer sends its metrics to MLflow
    through the evaluator actor, so it needs no MLflow of its own. Later imports of DeepSpeed find it loaded."""
    import importlib
    import sys

    name_deepspeed_accelerator()
    if "deepspeed" in sys.modules:
        return
    hidden = "mlflow" not in sys.modules   # (a process that has MLflow already has nothing to save)
    if hidden:
        sys.modules["mlflow"] = None   # `import mlflow` raises ImportError, which DeepSpeed takes for "not installed"
    try:
        importlib.import_module("deepspeed")
    finally:
        if hidden:
            del sys.modules["mlflow"]


def prepare_deepspeed_ops() -> None:
    """DeepSpeed compiles small C++ ops on first use (on CPU, its shared-memory all-reduce) with torch's JIT
    builder, which runs whichever `ninja` comes first on PATH and keeps the build in one folder per Python. Two
    ninjas (the system's and the pip package DeepSpeed depends on) log different hashes of the same command, so a
    process started from an activated venv and one that was not rebuilt the op for each other, ~30 s each time
    on 2 cores; with no ninja on PATH at all (a venv used without activating it) DeepSpeed refused to start. So:
    always the pip package's ninja, and one build folder per Python environment (two venvs' include paths
    differ, which would rebuild it too), unless the user chose a folder (TORCH_EXTENSIONS_DIR). On a CPU machine
    with no C++ compiler (a slim container) the op cannot be built, and DeepSpeed would fail the run: it is only a
    faster all-reduce between CPU ranks on one node, so gloo's serves instead. Only trainer processes call this:
    it changes the process's PATH."""
    import hashlib
    import shutil
    import sys

    import torch

    try:
        import ninja
    except ImportError:   # DeepSpeed requires the package; without it, leave PATH as it is
        ninja = None
    if ninja is not None:
        paths = os.environ.get("PATH", "").split(os.pathsep)
        if paths[:1] != [ninja.BIN_DIR]:
            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR] + [p for p in paths if p != ninja.BIN_DIR])
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        from torch.utils.cpp_extension import get_default_build_root

        environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(get_default_build_root(), f"env-{environment}")
    if not torch.cuda.is_available() and shutil.which(os.environ.get("CXX", "c++")) is None:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False   # what DeepSpeed does off Linux


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`values` (a CPU tensor) reduced over all ranks ("sum", "min" or "max"). NCCL reduces GPU tensors only, so
    under NCCL the values travel through the GPU; every rank must call it."""
    import torch
    import torch.distributed as dist

    operation = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    if dist.get_backend() == "nccl":
        on_gpu = values.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=operation)
        return on_gpu.cpu()
    reduced = values.clone()
    dist.all_reduce(reduced, op=operation)
    return reduced


def ranks_on_this_node() -> int:
    """How many ranks of the group run on this rank's machine (they share its memory); every rank must call it."""
    import socket

    return _gathered(socket.gethostname()).count(socket.gethostname())


class FolderRole(NamedTuple):
    first: bool                 # this rank is the first of the ranks that share the folder
    with_rank0: bool            # rank 0 is one of them
    folders: int                # how many different folders the group's ranks have
    sharing: tuple[int, ...]    # the ranks that share it (this one included)


def first_of_its_folder(folder: str) -> FolderRole:
    """This rank's role for `folder` (the same path on the same machine is one folder): on object storage each node
    has a mirror of its own, and one rank of each acts for the node. Every rank must call it."""
    import socket

    import torch.distributed as dist

    places = _gathered(f"{socket.gethostname()}:{folder}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    sharing = tuple(other for other, place in enumerate(places) if place == places[rank])
    return FolderRole(sharing[0] == rank, places[rank] == places[0], len(set(places)), sharing)


def _gathered(value: str) -> list[str]:
    """Each rank's value, by rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return [str(v) for v in values]
