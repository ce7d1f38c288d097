"""A dry run: validate, tokenize and pack the data exactly as the run would, plan the steps, and time a short
probe of the training step, without queueing anything. The packed rows land in the same cache the run uses, so
the run's DATA_VALIDATED event carries the same counts and it does not tokenize again."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ray_finetune import settings, storage
from ray_finetune.data.packing import PackedRows
from ray_finetune.data.prepare import on_cluster, prepare
from ray_finetune.spec import RunSpec
from ray_finetune.train.plan import make_plan, trainer_group_size

PROBE_MICRO_BATCHES = 2
# Tokenizing in this process (no cluster up), a large source is still cut in pieces, so progress is told as each is
# done; it costs nothing (62 MB of chats: 8 pieces 72.5 s, 2 pieces 79.7 s).
PIECES_IN_PROCESS = 8
# The probe holds the weights and their gradients (activations come on top); it runs only when they take at most
# this share of the probing device's free memory.
PROBE_COPIES = 2
PROBE_MEMORY_SHARE = 0.5
# A probe sent to a GPU of the cluster that was free a moment ago: how long it may wait for it and run (loading a
# large model included) before the dry run reports the time as unknown.
GPU_PROBE_TIMEOUT_S = 900
# Ray counts a GPU as taken for a moment after the task that held it ended (a dry run right after another): how long
# a dry run keeps looking for a free one before it says that none is.
FREE_GPU_GRACE_S = 5.0


@dataclass(frozen=True)
class Estimate:
    examples: int
    tokens: int                  # real tokens after packing (what the model reads)
    target_tokens: int           # tokens the loss is taken on
    truncated_examples: int
    dropped_examples: int
    length_histogram: dict[str, int]
    packing_efficiency: float
    rows: int
    context_length: int
    world_size: int
    global_batch_rows: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    seconds_per_step: float      # measured here: forward + backward of the step's micro-batches
    estimated_seconds: float     # training steps only (not evaluation, checkpoints or start-up)
    probe_device: str = ""
    # A CPU trainer's memory need as the trainer works it out (train/loop.fit_cpu), against this machine's available
    # memory: needed_gb, model_state_gb, activations_gb, budget_gb, activation_checkpointing; or, for a run that
    # would not fit, refused: what the trainer would fail with; or unknown: why the probe could not run. None on
    # GPUs (they fit by trying).
    memory: dict[str, Any] | None = field(default=None)
    eval: dict[str, Any] | None = field(default=None)
    tokenized: str = ""          # where the training data was tokenized, or that it came from the cache

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        histogram = ", ".join(f"{k}: {v}" for k, v in self.length_histogram.items())
        return "\n".join([
            f"examples            {self.examples:,} ({self.truncated_examples} truncated, {self.dropped_examples} "
            f"dropped with nothing to learn)",
            f"tokenized           {self.tokenized}",
            f"tokens              {self.tokens:,} in all, {self.target_tokens:,} trained on",
            f"example lengths     {histogram}",
            f"packing             {self.rows:,} rows of {self.context_length} tokens, "
            f"{self.packing_efficiency:.1%} full",
            f"batch               {self.global_batch_rows} row(s) per step on {self.world_size} worker(s)",
            f"steps               {self.total_steps:,} ({self.steps_per_epoch:,} per epoch, {self.epochs:.2f} epochs)",
            f"time per step       {self.seconds_per_step:.2f} s (probe on {self.probe_device})" if self.probed else
            f"time per step       unknown ({self.probe_device})",
            f"estimated training  {_duration(self.estimated_seconds) if self.probed else 'unknown'}",
        ] + ([f"memory per trainer  {self._memory_line()}"] if self.memory else []))

    def _memory_line(self) -> str:
        memory = self.memory or {}
        if "refused" in memory:
            return f"does not fit: {memory['refused']}"
        if "unknown" in memory:
            return f"unknown: {memory['unknown']}"
        recomputed = ", activations recomputed" if memory["activation_checkpointing"] else ""
        return (f"{memory['needed_gb']:g} GiB ({memory['model_state_gb']:g} model state, {memory['activations_gb']:g} "
                f"activations{recomputed}) of {memory['budget_gb']:g} GiB available")

    @property
    def probed(self) -> bool:
        return self.seconds_per_step > 0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _quiet(line: str) -> None:
    pass


def estimate(spec: RunSpec, *, probe: bool = True, progress: Callable[[str], None] | None = None) -> Estimate:
    """Counts, plan and probe for a run of `spec`. The data is tokenized as the run would tokenize it: across the
    cluster's free CPUs when one is up (a large dataset takes the cluster's cores, not one), else in this process;
    either way into the cache the run will read. No cluster is started for it, and CPUs that runs hold are left
    to them (a dry run must not wait for a training run to finish). `progress` is told, in a line, what it is doing
    (shards tokenized so far; the probe)."""
    import ray

    from ray_finetune.cluster import join_if_running
    from ray_finetune.train.models import load_tokenizer

    progress = progress or _quiet
    config = settings.load()
    tokenizer = load_tokenizer(spec.model_path)
    free_cpus = int(ray.available_resources().get("CPU", 0)) if join_if_running() else 0
    spread = free_cpus > 1
    sharding = on_cluster(free_cpus) if spread else {"parallelism": PIECES_IN_PROCESS}
    common = dict(task_type=spec.task_type, model_path=spec.model_path, tokenizer=tokenizer,
                  context_length=spec.context_length, cache_dir=config.packed_data_dir,
                  data_prep_cluster_id=spec.data_prep_cluster_id, **sharding)

    def tokenizing(parameter: str) -> Callable[[int, int], None]:
        return lambda done, total: progress(f"tokenizing {parameter}: {done} of {total} shards")

    train = prepare("train_data_path", spec.train_data_path, progress=tokenizing("train_data_path"), **common)
    evaluation = (prepare("eval_data_path", spec.eval_data_path, progress=tokenizing("eval_data_path"), **common)
                  if spec.eval_data_path else None)
    stats = train.stats
    world, on_gpus = trainer_group_size(_cluster_gpus(), config.trainer_device, config.trainer_workers,
                                        config.max_concurrent_runs)
    plan = make_plan(rows=stats["rows"], tokens=stats["tokens"], duration=spec.duration, world_size=world,
                     seed=spec.seed)
    seconds, device, memory = (_probe_where_it_trains(spec, storage.location_of(train.rows_path), plan, on_gpus,
                                                       progress) if probe
                               else (0.0, "not probed", None))
    return Estimate(
        examples=stats["examples"], tokens=stats["tokens"], target_tokens=stats["target_tokens"],
        truncated_examples=stats["truncated_examples"], dropped_examples=stats["dropped_examples"],
        length_histogram=stats["length_histogram"], packing_efficiency=stats["packing_efficiency"],
        rows=stats["rows"], context_length=spec.context_length, world_size=plan.world_size,
        global_batch_rows=plan.global_batch_rows, steps_per_epoch=plan.steps_per_epoch,
        total_steps=plan.total_steps, epochs=plan.epochs, seconds_per_step=seconds,
        estimated_seconds=seconds * plan.total_steps, probe_device=device, memory=memory,
        eval=evaluation.stats if evaluation else None,
        tokenized="from the cache (this data was packed the same way before)" if train.cached else
        f"in {train.shards} shard(s) " + ("as Ray tasks across the cluster" if spread and train.shards > 1
                                          else "in this process"),
    )


def _cluster_gpus() -> int:
    """The GPUs the scheduler would count: the connected Ray cluster's, else this machine's (with no cluster up, a
    dry run does not start one)."""
    import ray
    import torch

    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _free_memory(device) -> int:
    """Bytes free on `device` now: a GPU's own memory, else the host's (or its container's) available memory."""
    import torch

    from ray_finetune.train.hardware import host_memory

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_memory()[1]


def _probe_where_it_trains(spec: RunSpec, rows_path: str, plan, on_gpus: bool,
                           progress: Callable[[str], None]) -> tuple[float, str, dict[str, Any] | None]:
    """The probe, on the kind of device the run will train on. A run for the cluster's GPUs planned from a machine
    without one (a notebook, a laptop) is timed on a GPU of the cluster that is free now, as a Ray task: a CPU's
    step time says nothing about a GPU's. With none free, the time is unknown and says why (a dry run does not wait
    for training runs to end)."""
    import ray
    import torch

    if not on_gpus or torch.cuda.is_available():
        progress("probing a training step")
        return _probe_step_seconds(spec, rows_path, plan)
    if not ray.is_initialized() or not _a_gpu_free_within(FREE_GPU_GRACE_S):
        return 0.0, ("not probed: the run trains on GPUs, this machine has none, and no GPU of the cluster is free "
                     "now"), None
    progress("probing a training step on a GPU of the cluster")
    task = ray.remote(num_gpus=1, max_retries=0)(_probe_on_a_cluster_gpu).remote(spec, rows_path, plan)
    ready, _ = ray.wait([task], timeout=GPU_PROBE_TIMEOUT_S)
    if not ready:   # the GPU was taken between the look and the ask
        ray.cancel(task, force=True)
        return 0.0, f"not probed: no GPU of the cluster took the probe within {GPU_PROBE_TIMEOUT_S} s", None
    try:
        seconds, device, memory = ray.get(task)
    except ray.exceptions.RayError as error:   # e.g. a node that does not reach RAY_FINETUNE_STORAGE
        cause = getattr(error, "cause", None) or error
        return 0.0, f"not probed: the probe failed on a GPU node of the cluster ({type(cause).__name__}: " \
                    f"{str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else ''})", None
    return seconds, (device if device.startswith("not probed") else f"{device}, a GPU node of the cluster"), memory


def _a_gpu_free_within(seconds: float) -> bool:
    import ray

    deadline = time.monotonic() + seconds
    while ray.available_resources().get("GPU", 0) < 1:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _probe_on_a_cluster_gpu(spec: RunSpec, rows_path: str, plan) -> tuple[float, str, dict[str, Any] | None]:
    """The probe as a Ray task on a GPU node, its allocator set as a trainer's is: its trials of micro-batch sizes
    fragment the default one as a trainer's do, and would slow the steps it times."""
    from ray_finetune.train.distributed import prefer_expandable_gpu_memory

    prefer_expandable_gpu_memory()
    return _probe_step_seconds(spec, rows_path, plan)


def _probe_step_seconds(spec: RunSpec, rows_path: str, plan) -> tuple[float, str, dict[str, Any] | None]:
    """Time forward + backward of real packed rows; a step is gradient_accumulation_steps of them per rank. What
    the trainer fits to memory comes first (loop.fit_memory: on a CPU its memory need and whether activations are
    recomputed, which the timing then includes; on a GPU its micro-batch); a run that would not fit is not probed,
    and says why."""
    import numpy as np
    import torch

    from ray_finetune import settings
    from ray_finetune.train.hardware import (BF16, batch_width_multiple, choose_attention, choose_precision,
                                             training_device, zero_stage)
    from ray_finetune.train.loop import cpu_memory_budget, fit_memory, ready_attention
    from ray_finetune.train.models import load_model, parameter_count
    from ray_finetune.train.step import CausalLMLoss, forward_loss, make_batch

    rows = PackedRows.load(storage.fetch(rows_path))   # on another node: pulled from object storage
    chosen = settings.load()
    device = training_device(chosen.trainer_device)
    precision = choose_precision(device, chosen.precision)   # the precision the run will train in
    dtype = torch.bfloat16 if precision == BF16 else torch.float32
    # A model trained sharded over a GPU cluster can be far larger than the machine a dry run runs on.
    parameters = parameter_count(spec.model_path)
    needed = parameters * dtype.itemsize * PROBE_COPIES
    free = _free_memory(device)
    if needed > PROBE_MEMORY_SHARE * free:
        return 0.0, (f"not probed: the model's weights and gradients ({needed / 2**30:.1f} GiB) would not fit in the "
                     f"free memory of this machine's {device.type.upper()} ({free / 2**30:.1f} GiB)"), None
    # The attention a CPU trains with; on a GPU plain SDPA (its compiled kernels would take the probe minutes).
    attention = choose_attention(device, chosen.attention) if device.type == "cpu" else "sdpa"
    model = load_model(spec.model_path, dtype=dtype, attention=attention).to(device)
    ready_attention(model, rows, device)
    # What the trainer works out before it trains, worked out the same way: on a CPU its memory need against the
    # machine's (and whether it recomputes activations), on a GPU the micro-batch it finds (a GPU given the plan's
    # one row at a time runs well below its speed).
    try:
        stage = zero_stage(device, precision, chosen.zero_stage, parameters, plan.world_size)
        budget = cpu_memory_budget(chosen.cpu_memory_gb) if device.type == "cpu" and stage < 3 else None
        plan, fitted = fit_memory(model, parameters, plan, rows, device, precision, stage,
                                  chosen.activation_checkpointing, budget, chosen.micro_batch_tokens)
    except MemoryError as refused:   # a CPU's need beyond the machine's memory
        return 0.0, "not probed: the run would not fit in this machine's memory", {"refused": str(refused)}
    except torch.OutOfMemoryError as refused:   # a GPU that takes not even one row, or not the model's state
        return 0.0, "not probed: the run would not fit in this GPU's memory", {"refused": str(refused)}
    memory = ({**fitted["memory"], "activation_checkpointing": fitted["activation_checkpointing"]}
              if "memory" in fitted else None)
    timings = []
    for index in range(PROBE_MICRO_BATCHES + 1):   # the first one warms up
        batch = make_batch(rows, np.arange(index, index + plan.micro_batch_rows) % len(rows),
                           batch_width_multiple(device)).to(device)
        started = time.perf_counter()
        forward_loss(CausalLMLoss(model), batch).loss_sum.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    per_micro_batch = sum(timings[1:]) / PROBE_MICRO_BATCHES
    return per_micro_batch * plan.gradient_accumulation_steps, f"{device}, {precision}", memory
