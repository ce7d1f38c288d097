"""What the device a trainer runs on can do: which device, which precision, and the DeepSpeed set-up that follows.

Precision: on GPUs with bf16, bf16 compute with fp32 master weights, fp32 optimizer state and fp32 gradient
accumulation; elsewhere fp32. CPUs stay in fp32 by default although many multiply bf16 natively: on this
project's AVX512-BF16 development CPU bf16 made the demo's steps 1.46x faster but its eval loss after 26 steps
3.560 instead of 3.469 (BENCHMARKS.md) -- short CPU runs at small learning rates lose updates that fall below bf16's
resolution. RAY_FINETUNE_PRECISION=bf16 or fp32 overrides the choice.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from ray_finetune.train.attention import DOCUMENT_SDPA
from ray_finetune.train.memory import gpu_zero_stage
from ray_finetune.train.plan import TrainingPlan

BF16, FP32 = "bf16", "fp32"
GRADIENT_CLIPPING = 1.0


def training_device(requested: str = "auto") -> torch.device:
    """`requested` is RAY_FINETUNE_TRAINER_DEVICE: "cpu" keeps a trainer off GPUs it has not been given."""
    if requested != "cpu" and torch.cuda.is_available():
        # Ray gives each GPU worker its own CUDA_VISIBLE_DEVICES, so the local device is LOCAL_RANK (0 under Ray).
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def choose_attention(device: torch.device, requested: str = "auto", stage: int = 2) -> str:
    """How packed rows attend on `device`. CPUs run whole rows with SDPA once per document (attention.py; a model
    it does not suit runs each document as its own sequence instead, step.py); GPUs run whole rows: varlen
    FlashAttention when flash-attn is installed, else FlexAttention's block masks (compiled), both of which skip
    the masked-out blocks that a dense document mask makes SDPA compute. Under ZeRO-3 the model is loaded as
    shards, which cannot run before DeepSpeed wraps them (loop._ready_model), so FlexAttention, whose compiled
    kernels can fail, and per-document SDPA, which is checked per model, give way to SDPA, which is exact too."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return DOCUMENT_SDPA if stage < 3 else "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "flex_attention" if stage < 3 else "sdpa"


def host_memory(cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int]:
    """(total, available) bytes of memory on this machine for this process: the host's, or its container's when a
    cgroup limits memory below that (a Kubernetes pod, `docker --memory`), where the kernel kills at the limit
    whatever the host has free. Page cache that can be reclaimed counts as available, as the host's figure has it."""
    import psutil

    host = psutil.virtual_memory()
    for limit_file, usage_file, stat_file, cache_key in (
            ("memory.max", "memory.current", "memory.stat", "inactive_file"),                          # cgroup v2
            ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat",       # cgroup v1
             "total_inactive_file")):
        try:
            limit = int((cgroup_root / limit_file).read_text())   # v2 says "max" when there is no limit
            usage = int((cgroup_root / usage_file).read_text())
            stats = dict(line.split() for line in (cgroup_root / stat_file).read_text().splitlines())
        except (OSError, ValueError):
            continue
        if limit < host.total:
            return limit, max(0, min(host.available, limit - usage + int(stats.get(cache_key, 0))))
    return host.total, host.available


def batch_width_multiple(device: torch.device) -> int:
    """What step.make_batch rounds a batch's width up to once the padding that ends all its rows is cut off. CPUs
    compute every column they are given, so nothing; GPUs keep widths in steps of FlexAttention's 128-token blocks
    (also what tensor cores tile well), so that compiled layers and the caching allocator meet few shapes."""
    return 128 if device.type == "cuda" else 1


def choose_precision(device: torch.device, requested: str = "auto") -> str:
    if requested in (BF16, FP32):
        return requested
    return BF16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else FP32


def zero_stage(device: torch.device, precision: str, requested: str = "auto", parameters: int = 0,
               world: int = 1) -> int:
    """GPUs: ZeRO-2 (optimizer state and gradients sharded over the ranks), ZeRO-3 when a model of `parameters`
    needs it on `world` GPUs (memory.gpu_zero_stage). CPU: ZeRO-0 in fp32 (ZeRO-2's partition bookkeeping cost ~1 s
    a step there, measured: BENCHMARKS.md), ZeRO-1 in bf16 (DeepSpeed's BF16 optimizer: fp32 master weights and
    fp32 gradient accumulation)."""
    if requested != "auto":
        return int(requested)
    if device.type == "cuda":
        return gpu_zero_stage(parameters, world, torch.cuda.get_device_properties(device).total_memory, precision)
    return 1 if precision == BF16 else 0


def engine_reports_gradient_norm(stage: int, precision: str) -> bool:
    """Whether DeepSpeed's engine keeps the gradient norm it clips by (`get_global_grad_norm`). Its optimizers for
    ZeRO and for bf16 do; without either (fp32 ZeRO-0, the CPU default) it clips and forgets the norm, so there the
    training loop clips itself -- the same norm and the same clipping -- and keeps it."""
    return stage > 0 or precision == BF16


def deepspeed_config(plan: TrainingPlan, stage: int, precision: str) -> dict[str, Any]:
    bf16 = precision == BF16
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_rows,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.global_batch_rows,
        "gradient_clipping": GRADIENT_CLIPPING if engine_reports_gradient_norm(stage, precision) else 0.0,
        # ZeRO-1/2 save the optimizer state by rank; a run resumed on another number of workers converts it
        # (loop._resumable_state). DeepSpeed's "elastic" format cannot be converted, nor loaded on another count.
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16 and stage >= 1:
        # bf16 gradients summed over many micro-batches lose the small ones; accumulate in fp32. (Without ZeRO,
        # DeepSpeed accumulates bf16 gradients in bf16 and refuses anything else.)
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config
