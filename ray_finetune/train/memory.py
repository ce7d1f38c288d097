"""How many packed rows a GPU trains at once: the micro-batch, found by trying and backing off on out-of-memory.

The global batch (rows per optimizer step) is fixed by the plan; only its split into micro-batches x gradient
accumulation changes, and the loss of a step does not depend on that split (loop.py sums token losses over the
step). The search runs one forward + backward per candidate, largest first, on the rows the run will train on,
while memory the optimizer will hold later (fp32 master weights, Adam moments, fp32 gradient accumulation, all
sharded over the ranks by ZeRO-2) is already taken, so the size found still fits once training allocates them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ray_finetune.train.plan import TrainingPlan

# Bytes per parameter the optimizer side holds beyond the bf16 weights: fp32 master (4) + Adam moments (8) + fp32
# gradient accumulation (4), divided over the ranks; plus the bf16 gradients (2) every rank holds while reducing.
SHARDED_BYTES_PER_PARAMETER = 16
REPLICATED_BYTES_PER_PARAMETER = 2
# Left free for the allocator's fragmentation and the collectives' buffers.
HEADROOM = 0.08


def micro_batch_candidates(rows_per_rank: int) -> list[int]:
    """Divisors of the rows each rank trains per step, largest first (a micro-batch must divide them evenly)."""
    return [size for size in range(rows_per_rank, 0, -1) if rows_per_rank % size == 0]


def largest_fitting(candidates: list[int], try_size: Callable[[int], None]) -> tuple[int, list[int]]:
    """The first candidate whose trial does not run out of memory; also the sizes that did."""
    failed: list[int] = []
    for size in candidates:
        try:
            try_size(size)
            return size, failed
        except torch.OutOfMemoryError:
            failed.append(size)
        # Outside the handler: the error, and the activations its traceback still held, are gone by now.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    raise torch.OutOfMemoryError(
        f"not even one packed row of the context length fits in GPU memory (tried micro-batches of {failed} rows); "
        "use a shorter context_length, more GPUs per run, or a GPU with more memory")


def with_micro_batch(plan: TrainingPlan, micro_batch_rows: int) -> TrainingPlan:
    per_rank = plan.global_batch_rows // plan.world_size
    return dataclasses.replace(plan, micro_batch_rows=micro_batch_rows,
                               gradient_accumulation_steps=per_rank // micro_batch_rows)


def fit_micro_batch(plan: TrainingPlan, parameters: int, device: torch.device,
                    try_rows: Callable[[int], None]) -> tuple[TrainingPlan, dict]:
    """The plan with the largest micro-batch that fits on `device`, and what was tried (for the run's events).
    `try_rows(n)` runs forward + backward of n rows and frees what it made."""
    per_rank = plan.global_batch_rows // plan.world_size
    reserve_bytes = parameters * (SHARDED_BYTES_PER_PARAMETER / plan.world_size + REPLICATED_BYTES_PER_PARAMETER)
    free, total = torch.cuda.mem_get_info(device)
    reserve_bytes += int(total * HEADROOM)
    reserved = torch.empty(int(min(reserve_bytes, free)), dtype=torch.uint8, device=device)
    try:
        size, failed = largest_fitting(micro_batch_candidates(per_rank), try_rows)
    finally:
        del reserved
        torch.cuda.empty_cache()
    return with_micro_batch(plan, size), {"micro_batch_rows": size, "out_of_memory_at": failed,
                                          "reserved_for_optimizer_gb": round(reserve_bytes / 2**30, 2)}
