"""What a run keeps in GPU memory: the ZeRO stage, the micro-batch, and whether activations are recomputed.

ZeRO-2 unless its model state would leave too little room for activations; then ZeRO-3, which shards the weights
too (at the cost of gathering every layer's weights from all ranks whenever it runs).

The micro-batch (packed rows a GPU trains at once) is found by trying and backing off on out-of-memory.

The global batch (rows per optimizer step) is fixed by the plan; only its split into micro-batches x gradient
accumulation changes, and the loss of a step does not depend on that split (loop.py sums token losses over the
step). The search runs one forward + backward per candidate, largest first, on the rows the run will train on,
while memory the optimizer will hold later (fp32 master weights, Adam moments, fp32 gradient accumulation, all
sharded over the ranks by ZeRO-2) is already taken, so the size found still fits once training allocates them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ray_finetune.train.plan import TrainingPlan

@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of what training keeps on the GPUs, by what ZeRO does with each part."""
    weights: int     # what the model computes with: whole on every GPU under ZeRO-2, sharded under ZeRO-3
    gradients: int   # whole on every GPU while ZeRO-2 reduces them (bucket by bucket), sharded under ZeRO-3
    optimizer: int   # sharded under ZeRO-1/2/3: Adam's two moments, and under bf16 the fp32 master weights and
                     # fp32 gradient accumulation

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def per_gpu(self, stage: int, world: int) -> float:
        """Bytes per parameter on each of `world` GPUs: ZeRO-3 shards everything, ZeRO-2 the optimizer side only."""
        return self.total / world if stage == 3 else self.weights + self.gradients + self.optimizer / world


STATE_BYTES = {"bf16": StateBytes(weights=2, gradients=2, optimizer=16), "fp32": StateBytes(4, 4, 8)}
# Left free for the allocator's fragmentation and the collectives' buffers.
HEADROOM = 0.08
# When ZeRO-2's state (weights and gradients whole, optimizer sharded) would take more than this share of a GPU,
# too little is left for activations at a useful micro-batch, and ZeRO-3 pays off.
ZERO2_STATE_SHARE = 0.6


def gpu_zero_stage(parameters: int, world: int, gpu_memory: int, precision: str = "bf16") -> int:
    """ZeRO-2, or ZeRO-3 when ZeRO-2's model state would take more than ZERO2_STATE_SHARE of each GPU and there are
    ranks to shard the weights over. Raises, naming how many GPUs it would take, when the model state does not fit
    even sharded over all `world` GPUs (ZeRO-3 loads each rank's shard only: models.load_model)."""
    state_bytes = STATE_BYTES[precision]
    total = parameters * state_bytes.total
    stage = 2 if world == 1 or parameters * state_bytes.per_gpu(2, world) <= ZERO2_STATE_SHARE * gpu_memory else 3
    state = parameters * state_bytes.per_gpu(stage, world)
    usable = (1 - HEADROOM) * gpu_memory
    if state > usable:
        raise torch.OutOfMemoryError(
            f"the model's training state ({precision} weights and gradients, Adam moments"
            f"{', fp32 master weights' if precision == 'bf16' else ''}: {total / 2**30:.0f} GiB) takes "
            f"{state / 2**30:.1f} GiB per GPU under ZeRO-{stage} on {world} GPU(s), more than the "
            f"{usable / 2**30:.1f} GiB usable of each GPU's {gpu_memory / 2**30:.0f} GiB; it needs at least "
            f"{math.ceil(total / usable)} such GPUs per run (RAY_FINETUNE_TRAINER_WORKERS, and as many GPUs in the "
            "cluster) or GPUs with more memory")
    return stage


def checkpoint_activations(model: torch.nn.Module) -> bool:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (about a third more
    compute, a fraction of the activation memory). False when the model cannot."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    return True


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


def fit_micro_batch(plan: TrainingPlan, parameters: int, device: torch.device, try_rows: Callable[[int], None],
                    recompute_activations: Callable[[], bool] | None = None,
                    precision: str = "bf16") -> tuple[TrainingPlan, dict]:
    """The plan with the largest micro-batch that fits on `device`, and what was tried (for the run's events).
    `try_rows(n)` runs forward + backward of n rows and frees what it made. When not even one row fits and
    `recompute_activations` is given, it is called (activation checkpointing: only when memory requires it) and the
    search runs again."""
    per_rank = plan.global_batch_rows // plan.world_size
    state_bytes = STATE_BYTES[precision]   # the weights are on the GPU already
    reserve_bytes = parameters * (state_bytes.per_gpu(2, plan.world_size) - state_bytes.weights)
    free, total = torch.cuda.mem_get_info(device)
    reserve_bytes += int(total * HEADROOM)
    reserved = torch.empty(int(min(reserve_bytes, free)), dtype=torch.uint8, device=device)
    candidates = micro_batch_candidates(per_rank)
    recomputing = False
    try:
        try:
            size, failed = largest_fitting(candidates, try_rows)
        except torch.OutOfMemoryError:
            if recompute_activations is None or not recompute_activations():
                raise
            recomputing = True
        if recomputing:   # outside the handler, so the failed trials' memory is gone
            size, failed = largest_fitting(candidates, try_rows)
    finally:
        del reserved
        torch.cuda.empty_cache()
    return with_micro_batch(plan, size), {"micro_batch_rows": size, "out_of_memory_at": failed,
                                          "activation_checkpointing": recomputing,
                                          "reserved_for_optimizer_gb": round(reserve_bytes / 2**30, 2)}
