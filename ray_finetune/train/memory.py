"""What a run keeps in memory: the ZeRO stage, the micro-batch, and whether activations are recomputed.

ZeRO-2 unless its model state would leave too little room for activations; then ZeRO-3, which shards the weights
too (at the cost of gathering every layer's weights from all ranks whenever it runs).

The micro-batch (packed rows a GPU trains at once) is found by timing forward + backward passes of growing size,
stopping where a larger one runs out of memory or is no longer worth its memory.

The global batch (rows per optimizer step) is fixed by the plan; only its split into micro-batches x gradient
accumulation changes, and the loss of a step does not depend on that split (loop.py sums token losses over the
step). The search times forward + backward passes on the rows the run will train on, smallest first, about
doubling, while memory the optimizer will hold later (fp32 master weights, Adam moments, fp32 gradient
accumulation, all sharded over the ranks by ZeRO-2) is already taken, so the size found still fits once training
allocates them. Growing from small sizes rather than backing off from the largest keeps out-of-memory trials to at
most one (each leaves the allocator's memory split: BENCHMARKS.md measured 26% of the throughput lost to two), and
stops where the GPU is busy already: beyond that a larger micro-batch only raises the peak memory. A size whose
gain the last two timings already rule out is not even tried, so the search's own peak is the kept size's.

A CPU has no out-of-memory error to back off from (the kernel kills the process, and the run would only say its
trainer died), so there the need is worked out before training: the model state by its bytes per parameter, the
activations from what autograd keeps of two short probe rows (exact for the model at hand, in its dtype and
attention), scaled to the rows a micro-batch holds. Activations are recomputed when they would not fit otherwise;
a run that does not fit even so fails at once, saying how much it needs and what to change.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

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
# A GPU's micro-batch doubles only while that brings at least this much more throughput: past that point the GPU is
# busy already, and twice the activations would only raise the peak memory (other work on the GPU, a longer row
# later, the allocator's own fragmentation all need it more). Not for a group of several GPUs: ZeRO-2 reduces the
# gradients after every micro-batch, a cost no one-GPU trial times, so there fewer, larger micro-batches are kept.
WORTH_DOUBLING = 0.03


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


def micro_batch_candidates(rows_per_rank: int, most_rows: int = 0) -> list[int]:
    """Divisors of the rows each rank trains per step, largest first (a micro-batch must divide them evenly), none
    above `most_rows` (0: no limit; 1 always divides)."""
    return [size for size in range(rows_per_rank, 0, -1)
            if rows_per_rank % size == 0 and (not most_rows or size <= most_rows)]


def micro_batch_rows_limit(micro_batch_tokens: int, context_length: int) -> int:
    """RAY_FINETUNE_MICRO_BATCH_TOKENS as whole rows of the context, at least one; 0 (no limit) stays 0."""
    return max(1, micro_batch_tokens // context_length) if micro_batch_tokens else 0


def growing_sizes(candidates: list[int]) -> list[int]:
    """The candidates (micro_batch_candidates) to try, smallest first, each at least twice the one before; the
    largest always (a plan's rows per rank can be any number, and every size tried costs a trial)."""
    sizes: list[int] = []
    for size in sorted(candidates):
        if not sizes or size >= 2 * sizes[-1]:
            sizes.append(size)
    if sizes and sizes[-1] != max(candidates):
        sizes.append(max(candidates))
    return sizes


@dataclass(frozen=True)
class MicroBatchSearch:
    """What fastest_fitting found: the size, the size that ran out of memory (if one did), the rows per second of the
    sizes timed, and of the next size when it was predicted not to pay and so never tried (its memory never taken)."""
    size: int
    out_of_memory_at: list[int]
    rows_per_second: dict[int, float]
    predicted_rows_per_second: dict[int, float]


def predicted_rows_per_second(timed: dict[int, float], size: int) -> float:
    """Rows per second of `size` rows, from the line through the last two (rows, seconds) timed: a pass's time is
    a fixed part (launching, the loss's small kernels, a GPU not yet full) plus a part per row. Once the GPU is busy
    the fixed part is ~0 and twice the rows predict twice the time: nothing to gain, so nothing is tried."""
    (rows_a, seconds_a), (rows_b, seconds_b) = list(timed.items())[-2:]
    per_row = (seconds_b - seconds_a) / (rows_b - rows_a)
    seconds = seconds_b + per_row * (size - rows_b)
    return size / seconds if seconds > 0 else math.inf


def fastest_fitting(candidates: list[int], seconds_for: Callable[[int], float],
                    worth_doubling: float = WORTH_DOUBLING) -> MicroBatchSearch:
    """Grow the micro-batch through growing_sizes(candidates) while the next size fits and trains at least
    1 + `worth_doubling` times the rows per second of the one before; `seconds_for(n)` times forward + backward of n
    rows. A size predicted (predicted_rows_per_second) not to pay is not tried at all, so that the search's own
    peak memory is that of the size it keeps."""
    timed: dict[int, float] = {}   # rows -> seconds
    failed: list[int] = []
    predicted: dict[int, float] = {}
    chosen = 0
    for size in growing_sizes(candidates):
        if len(timed) >= 2:
            expected = predicted_rows_per_second(timed, size)
            if expected < (1 + worth_doubling) * chosen / timed[chosen]:
                predicted[size] = expected
                break
        try:
            timed[size] = max(seconds_for(size), 1e-9)
        except torch.OutOfMemoryError:
            failed.append(size)
            break
        if chosen and size / timed[size] < (1 + worth_doubling) * chosen / timed[chosen]:
            break
        chosen = size
    if failed and torch.cuda.is_available():   # outside the handler: the error's activations are gone by now
        torch.cuda.empty_cache()
    if not chosen:
        raise torch.OutOfMemoryError(
            f"not even one packed row of the context length fits in GPU memory (tried micro-batches of {failed} "
            "rows); use a shorter context_length, more GPUs per run, or a GPU with more memory")
    return MicroBatchSearch(size=chosen, out_of_memory_at=failed,
                            rows_per_second={rows: rows / seconds for rows, seconds in timed.items()},
                            predicted_rows_per_second=predicted)


def timed_trial(try_rows: Callable[[int], None], device: torch.device) -> Callable[[int], float]:
    """Seconds of `try_rows(n)` (forward + backward of n rows) once warm: the first run of a size picks and
    compiles its kernels and grows the allocator, which training pays once, not per step."""
    def finish() -> None:   # a GPU runs the trial's kernels after try_rows returns
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def seconds_for(count: int) -> float:
        try_rows(count)
        finish()
        started = time.perf_counter()
        try_rows(count)
        finish()
        return time.perf_counter() - started

    return seconds_for


def with_micro_batch(plan: TrainingPlan, micro_batch_rows: int) -> TrainingPlan:
    per_rank = plan.global_batch_rows // plan.world_size
    return dataclasses.replace(plan, micro_batch_rows=micro_batch_rows,
                               gradient_accumulation_steps=per_rank // micro_batch_rows)


def fit_micro_batch(plan: TrainingPlan, parameters: int, device: torch.device, seconds_for: Callable[[int], float],
                    recompute_activations: Callable[[], bool] | None = None,
                    precision: str = "bf16", most_rows: int = 0) -> tuple[TrainingPlan, dict]:
    """The plan with the micro-batch fastest_fitting finds on `device` (of at most `most_rows` rows, 0: any), and
    what was tried (for the run's events). `seconds_for(n)` times forward + backward of n rows (timed_trial) and
    frees what it made. When not even one row fits and `recompute_activations` is given, it is called (activation
    checkpointing: only when memory requires it) and the search runs again."""
    per_rank = plan.global_batch_rows // plan.world_size
    state_bytes = STATE_BYTES[precision]   # the weights are on the GPU already
    reserve_bytes = parameters * (state_bytes.per_gpu(2, plan.world_size) - state_bytes.weights)
    free, total = torch.cuda.mem_get_info(device)
    reserve_bytes += int(total * HEADROOM)
    reserved = torch.empty(int(min(reserve_bytes, free)), dtype=torch.uint8, device=device)
    candidates = micro_batch_candidates(per_rank, most_rows)
    worth_doubling = WORTH_DOUBLING if plan.world_size == 1 else -1.0   # a group: grows while it fits
    recomputing = False
    try:
        try:
            found = fastest_fitting(candidates, seconds_for, worth_doubling)
        except torch.OutOfMemoryError:
            if recompute_activations is None or not recompute_activations():
                raise
            recomputing = True
        if recomputing:   # outside the handler, so the failed trials' memory is gone
            found = fastest_fitting(candidates, seconds_for, worth_doubling)
    finally:
        del reserved
        torch.cuda.empty_cache()
    return with_micro_batch(plan, found.size), {
        "micro_batch_rows": found.size, "micro_batch_rows_limit": most_rows or None,
        "out_of_memory_at": found.out_of_memory_at,
        "rows_per_second": {str(n): round(rate, 3) for n, rate in found.rows_per_second.items()},
        "predicted_rows_per_second": {str(n): round(rate, 3) for n, rate in found.predicted_rows_per_second.items()},
        "activation_checkpointing": recomputing, "reserved_for_optimizer_gb": round(reserve_bytes / 2**30, 2)}


# --- CPU ---------------------------------------------------------------------------------------------------------

# Peak resident memory of a CPU step, beyond the model state and the output layer's chunk of logits, over the
# activations autograd keeps for it: the backward pass's own buffers, what the allocator holds on to. Measured with
# bench/gpu_bench.py --scaling on CPU (SmolLM2-135M shape, fp32, one row a step): 1.09x at context 512, 1.30x at
# 2048, 1.43x at 8192 (BENCHMARKS.md). Rounded up: recomputing activations when not needed costs some speed, a
# trainer the kernel kills costs the run.
ACTIVATION_PEAK = 1.5
# Recomputing activations, the process's peak grows by far more than the one layer's activations held at a time:
# glibc keeps the buffers of the layers recomputed before (measured, SmolLM2-135M shape, fp32, peak over the model:
# 0.52 GiB at context 2048 with MALLOC_MMAP_THRESHOLD_ fixed, 1.22 GiB without; 5.98 GiB at 8192, where the layer
# inputs and one layer's activations are ~1 GiB). Counted as this many layers' activations, which covers every
# case measured (30 layers at 2048, 4096 and 8192 tokens; 12 layers at 4096): a model of this many layers or fewer
# gains nothing from recomputing on a CPU by this count, and is not made to.
RECOMPUTE_WORKSPACE_LAYERS = 8
# Lengths of the probe rows (two, so that what is kept whatever the length -- the chunked loss's output-layer
# gradient -- is told apart from what grows with it).
PROBE_TOKENS = (16, 32)


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes autograd keeps for the backward pass of one micro-batch, as fixed + per_token x tokens."""
    fixed: float
    per_token: float

    def of(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    def recomputed(self, layers: int, hidden_bytes: int) -> "ActivationBytes":
        """With each decoder layer's activations recomputed in the backward pass: every layer keeps its input
        (hidden_bytes a token), and the layer being recomputed holds its activations and their gradients -- counted
        as RECOMPUTE_WORKSPACE_LAYERS layers' activations, for what the allocator keeps of each layer's in turn."""
        return ActivationBytes(self.fixed, layers * hidden_bytes
                               + RECOMPUTE_WORKSPACE_LAYERS * self.per_token / max(1, layers))


def saved_for_backward(run_forward: Callable[[], Any], parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of what `run_forward` computes (each storage once;
    the parameters, which exist anyway, not counted). Nothing runs backward: the graph is dropped on return."""
    weights = {p.untyped_storage().data_ptr() for p in parameters}
    kept: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        outputs = run_forward()
    del outputs
    return sum(kept.values())


def activation_bytes(saved_at: Callable[[int], int]) -> ActivationBytes:
    """The line through what `saved_at(tokens)` (saved_for_backward of a row of that many tokens) gives at the
    PROBE_TOKENS lengths. Linear because attention here never holds a [tokens x tokens] score matrix (SDPA per
    document, FlashAttention); a model only eager attention runs would be underestimated at long rows."""
    short, long = PROBE_TOKENS
    at_short, at_long = saved_at(short), saved_at(long)
    per_token = max(0.0, (at_long - at_short) / (long - short))
    return ActivationBytes(fixed=max(0.0, at_short - per_token * short), per_token=per_token)


@dataclass(frozen=True)
class CpuMemoryNeed:
    state: float                 # weights, gradients, optimizer state
    activations: float           # at the step's peak, for one micro-batch
    budget: float
    recomputing: bool

    @property
    def total(self) -> float:
        return self.state + self.activations

    def as_dict(self) -> dict[str, Any]:
        """In GiB, to three significant digits (a tiny model's needs are megabytes)."""
        return {name: float(f"{value / 2**30:.3g}") for name, value in (
            ("needed_gb", self.total), ("model_state_gb", self.state), ("activations_gb", self.activations),
            ("budget_gb", self.budget))}


def fit_cpu_memory(*, parameters: int, precision: str, activations: ActivationBytes, tokens: int, layers: int,
                   hidden_bytes: int, transient: float, budget: float, budget_source: str, checkpointing: str,
                   context_length: int) -> CpuMemoryNeed:
    """Whether a CPU trainer fits `budget` bytes with a micro-batch of `tokens` tokens: as it is, or (checkpointing
    "auto" or "on") recomputing activations. `transient`: bytes held for a moment at the step's peak whatever is
    recomputed (the loss's chunk of logits). Raises MemoryError saying what it needs and what to change."""
    state = parameters * STATE_BYTES[precision].total
    recomputed = activations.recomputed(layers, hidden_bytes)

    def need(recomputing: bool) -> CpuMemoryNeed:
        kept = (recomputed if recomputing else activations).of(tokens)
        return CpuMemoryNeed(state=state, activations=kept * ACTIVATION_PEAK + transient, budget=budget,
                             recomputing=recomputing)

    as_is = need(checkpointing == "on")
    if as_is.total <= budget:
        return as_is
    # (A model of few layers saves nothing by recomputing them: one layer's activations are most of them.)
    best = min(as_is, need(True), key=lambda option: option.total) if checkpointing == "auto" else as_is
    if best.total <= budget:
        return best
    raise MemoryError(
        f"training needs about {_size(best.total)} on each CPU trainer at context_length={context_length}: "
        f"{_size(state)} of model state ({parameters / 1e6:.3g} M parameters in {precision}: weights, gradients, "
        f"Adam moments) and {_size(best.activations)} of activations for a row of {tokens} tokens"
        f"{' recomputed layer by layer' if best.recomputing else ''}, more than the {_size(budget)} it has "
        f"({budget_source}). Use a shorter context_length, a smaller model, or a machine with more memory"
        + ("" if best.recomputing or checkpointing == "auto" else
           f"; RAY_FINETUNE_ACTIVATION_CHECKPOINTING=auto would recompute activations (about {_size(need(True).total)})"))


def _size(count: float) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.3g} MiB"
