"""The trainer workers' torch.distributed group: a free port for its rendezvous, and joining it.

Also what a benchmark or test needs to run the training loop in a plain process (a group of one)."""
from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it), for a server or a rendezvous about to start."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def join_process_group(rank: int, world_size: int, master: tuple[str, int] | None = None) -> None:
    """One group over all ranks: NCCL between GPUs, gloo on CPU. Rank 0 listens at `master` (by default a free
    local port: a group of one). DeepSpeed reads RANK/WORLD_SIZE/LOCAL_RANK; Ray gives each GPU worker its own
    CUDA_VISIBLE_DEVICES, so the local rank is always 0."""
    import torch
    import torch.distributed as dist

    host, port = master or ("127.0.0.1", free_port())
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"tcp://{host}:{port}",
                            rank=rank, world_size=world_size)


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
