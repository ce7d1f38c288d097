"""The trainer workers' torch.distributed group: a free port for its rendezvous, and joining it.

Also what a benchmark or test needs to run the training loop in a plain process (a group of one)."""
from __future__ import annotations

import os
import socket


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
