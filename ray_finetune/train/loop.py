"""The training loop: one explicit loop around a DeepSpeed engine (accumulate, clip, step, report, checkpoint).

Runs on every rank of an initialized torch.distributed group. The loss of a step is the mean over *all* target
tokens of that step, across micro-batches and ranks: each micro-batch contributes its summed token loss divided by
the step's total target count (known in advance from the plan), so short and long rows weigh what their tokens
weigh, whatever the world size.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ray_finetune.data.packing import PackedRows, packed_data_id
from ray_finetune import settings, storage
from ray_finetune.train import allocator, checkpoint
from ray_finetune.errors import CheckpointError, TrainingDivergedError, one_line
from ray_finetune.spec import Duration
from ray_finetune.train.attention import DOCUMENT_SDPA, check_documents_apart, plain_attention
from ray_finetune.train.loss import CHUNK_LOGIT_ELEMENTS
from ray_finetune.train.hardware import (BF16, GRADIENT_CLIPPING, batch_width_multiple, choose_attention,
                                         choose_precision, deepspeed_config, engine_reports_gradient_norm,
                                         host_memory, training_device, zero_stage)
from ray_finetune.train.distributed import FolderRole, all_reduce, first_of_its_folder, ranks_on_this_node
from ray_finetune.train.evaluation import EvalResult, Evaluation
from ray_finetune.train.memory import (CpuMemoryNeed, activation_bytes, checkpoint_activations, fit_cpu_memory,
                                       fit_micro_batch, micro_batch_rows_limit, saved_for_backward,
                                       timed_trial,
                                       with_micro_batch)
from ray_finetune.train.models import load_initial_model, load_tokenizer, parameter_count, set_stop_tokens
from ray_finetune.train.plan import EMPTY_ROW, TrainingPlan
from ray_finetune.train.publishing import Published, Publisher
from ray_finetune.train.schedule import lr_factor
from ray_finetune.train.step import Batch, CausalLMLoss, forward_loss, make_batch, per_document_for

BETAS = (0.9, 0.95)
# Ray's default share of a node's memory beyond which its memory monitor kills a worker (RAY_memory_usage_threshold).
RAY_MEMORY_USAGE_THRESHOLD = 0.95


@dataclass(frozen=True)
class TrainConfig:
    run_name: str
    model_path: str
    init_weights_path: str | None     # custom_weights_path resolved to a weights folder
    train_rows_path: str
    plan: TrainingPlan
    learning_rate: float
    save_folder: str
    rank: int
    world_size: int
    seed: int
    checkpoint_every: Duration = Duration(value=1, unit="ep")
    checkpoints_to_keep: int = 3
    resume_from: str | None = None    # a complete checkpoint of this run: continue exactly where it was
    eval_rows_path: str | None = None  # evaluated at every checkpoint, on the trainers' own devices
    eval_prompts: tuple[str, ...] = ()  # sampled at every checkpoint
    task_type: str = "CHAT_COMPLETION"  # how eval prompts are formatted
    evaluate_first: bool = False      # also before the first step (the baseline a run's eval curve starts from)


@dataclass(frozen=True)
class TrainOutcome:
    final_checkpoint: Path | None
    steps_done: int
    stopped: bool                     # ended early because a stop was requested


STOP_NONE, STOP, STOP_AND_CHECKPOINT = 0, 1, 2


@dataclass(frozen=True)
class StepReport:
    step: int                # 1-based optimizer steps done
    total_steps: int
    epoch: int
    loss: float
    token_accuracy: float
    grad_norm: float         # L2 norm of the step's gradient (of the mean token loss, all ranks), before clipping
    learning_rate: float
    tokens: int              # real (non-padding) tokens this step, all ranks
    target_tokens: int
    tokens_per_second: float
    step_seconds: float
    estimated_end_time: datetime


class Reporter(Protocol):
    """How the loop tells the outside world what happened. Only rank 0's reporter is called."""

    def model_initialized(self, info: dict[str, Any]) -> None: ...
    def step_finished(self, report: StepReport) -> None: ...
    # Before a checkpoint is written: the steps it will hold must be in the log first (see _checkpoint).
    def saving_checkpoint(self, step: int) -> None: ...
    # Once the checkpoint is complete on the storage (on object storage: uploaded while training went on).
    def checkpoint_saved(self, published: Published) -> None: ...
    def checkpoint_removed(self, path: str) -> None: ...
    # After each checkpoint and, when asked, before the first step; only for a run with eval data or prompts.
    def evaluated(self, step: int, epoch: int, result: EvalResult) -> None: ...
    def stop_requested(self) -> int: ...   # STOP_NONE, STOP or STOP_AND_CHECKPOINT


class SilentReporter(Reporter):
    """A Reporter that tells no one and never stops (the protocol's methods do nothing): what ranks other than 0 get
    (rank 0 alone reports and decides about stopping), and the base of one that listens to a few calls only
    (benchmarks, tests)."""

    def close(self) -> None: ...
    def stop_requested(self) -> int:
        return STOP_NONE


def is_checkpoint_step(plan: TrainingPlan, every: Duration, step: int) -> bool:
    """Whether optimizer step `step` (0-based) ends with a checkpoint. The last step always does."""
    if step + 1 == plan.total_steps:
        return True
    if every.unit == "ba":
        return (step + 1) % every.value == 0
    return plan.is_epoch_end(step) and (plan.epoch_of(step) + 1) % every.value == 0


def train(config: TrainConfig, reporter: Reporter) -> TrainOutcome:
    """Train to the end of the plan (or until a stop is requested), from step 0 or from `resume_from`."""
    import deepspeed

    plan, rank, world = config.plan, config.rank, config.world_size
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    chosen = settings.load()
    device = training_device(chosen.trainer_device)
    precision = choose_precision(device, chosen.precision)
    # On object storage each node has a mirror of its own, and one rank of each acts for it.
    node = (first_of_its_folder(str(storage.mirror_root()))
            if storage.is_mirrored(checkpoint.checkpoints_dir(config.save_folder, config.run_name))
            or (config.resume_from and storage.is_mirrored(storage.local(config.resume_from))) else None)
    # On object storage, what this node has not got yet comes down first (one rank of a node downloads each).
    rows = PackedRows.load(storage.fetch(config.train_rows_path))
    eval_rows = PackedRows.load(storage.fetch(config.eval_rows_path)) if config.eval_rows_path else None
    init_weights = storage.fetch(config.init_weights_path) if config.init_weights_path else None
    tokenizer = load_tokenizer(config.model_path)
    parameters = parameter_count(config.model_path)
    stage = zero_stage(device, precision, chosen.zero_stage, parameters, world)
    attention = choose_attention(device, chosen.attention, stage)
    # ZeRO-3 keeps the plan's micro-batch (fit_memory), so this is the config the engine will train with.
    sharded_by = deepspeed_config(plan, stage, precision) if stage == 3 else None
    # What this machine has for the run, taken before the model is loaded (the need counts the model too).
    cpu_budget = cpu_memory_budget(chosen.cpu_memory_gb) if device.type == "cpu" and stage < 3 else None
    # In the dtype the engine trains the weights in: under bf16 DeepSpeed casts them to bf16 before it makes the
    # fp32 master copies anyway, and a bf16 checkpoint then stays memory-mapped (shared by the ranks of a node)
    # instead of each rank converting its own fp32 copy on the host (4 bytes per parameter, per rank).
    model = load_initial_model(config.model_path, init_weights, attention, sharded_by,
                               dtype=torch.bfloat16 if precision == BF16 else torch.float32)
    stop_tokens = set_stop_tokens(model, tokenizer)
    sizing = _ready_model(model, rows, device, precision, stage, compile_layers=chosen.compile == "on")
    plan, fitted = fit_memory(model, parameters, plan, rows, device, precision, stage,
                                chosen.activation_checkpointing, cpu_budget, chosen.micro_batch_tokens)
    sizing.update(fitted)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=BETAS, weight_decay=0.0,
                                  fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan.total_steps))
    resume_from = _resumable_state(config, checkpoint.EngineLayout(stage, precision == BF16), node)
    engine_config = deepspeed_config(plan, stage, precision)
    if resume_from is not None and resume_from.name == checkpoint.UNIVERSAL_DIR:
        engine_config["checkpoint"] = {"load_universal": True}
    wrapped = CausalLMLoss(model, probe=stage < 3)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, lr_scheduler=schedule,
                                           config=engine_config)
    if world == 1 and stage == 0:
        # Nothing to reduce, but DeepSpeed would still copy every gradient into one flat buffer and back after each
        # micro-batch (0.8 s a step for SmolLM2-135M on a 2-core CPU).
        engine.enable_backward_allreduce = False
    if stage == 3:
        wrapped.probe_split()
        for parameter in wrapped.borrowed_parameters():
            deepspeed.zero.register_external_parameter(wrapped, parameter)
    per_document = per_document_for(sharded=stage == 3)
    clips_here = not engine_reports_gradient_norm(stage, precision)
    width_multiple = batch_width_multiple(device)
    start_step = resume(engine, resume_from) if resume_from else 0
    if node and config.resume_from and storage.is_mirrored(resume_from):   # loaded by every rank: this node's
        _barrier(world)                                                    # (partial) copy goes
        if node.first:
            storage.drop_local(storage.local(config.resume_from))
    if rank == 0:
        reporter.model_initialized({
            "parameters": parameters, "device": str(device),
            "precision": precision, "attention": model.config._attn_implementation, "zero_stage": stage,
            "world_size": world,
            "plan": plan.as_dict(), **sizing, "chunked_loss": wrapped.split is not None,
            "stop_tokens": tokenizer.convert_ids_to_tokens(stop_tokens),
            "weights_from": config.resume_from or config.init_weights_path or config.model_path,
            "resumed_at_step": start_step, "pid": os.getpid(), "host_allocator": allocator.in_use(),
        })
    evaluation = Evaluation(engine, eval_rows, list(config.eval_prompts), tokenizer, config.task_type, plan, rank,
                            world, device, sharded=stage == 3)
    if config.evaluate_first and start_step == 0:
        _evaluate(evaluation, config, reporter, step=0, epoch=0)
    engine.train()
    publisher = Publisher(config.save_folder, config.run_name, rank, config.checkpoints_to_keep,
                          report=lambda published: _report_published(reporter, published) if rank == 0 else None,
                          node=node)
    started = time.monotonic()
    last_checkpoint: Path | None = storage.local(config.resume_from) if config.resume_from else None
    try:
        for step in range(start_step, plan.total_steps):
            stop, uploading = _agree(reporter.stop_requested() if rank == 0 else STOP_NONE, publisher.uploading(),
                                     world)
            publisher.at_step_boundary(any_node_uploading=uploading)
            if stop != STOP_NONE:
                already_saved = last_checkpoint is not None and checkpoint.parse_name(last_checkpoint.name)[1] == step
                if stop == STOP_AND_CHECKPOINT and step > 0 and not already_saved:
                    last_checkpoint = _checkpoint(engine, tokenizer, config, reporter, evaluation, publisher, step - 1)
                publisher.finish()
                return TrainOutcome(final_checkpoint=last_checkpoint, steps_done=step, stopped=True)
            step_started = time.monotonic()
            all_rows = plan.step_rows(step)
            step_targets = rows.target_tokens(all_rows[all_rows != EMPTY_ROW])
            sums = torch.zeros(4, dtype=torch.float64)   # loss, targets, correct, real tokens (this rank)
            for micro_rows in plan.rank_micro_batches(step, rank):
                batch = make_batch(rows, micro_rows, width_multiple).to(device)
                result = forward_loss(engine, batch, per_document)
                # DeepSpeed averages gradients over ranks; multiplying by world undoes that, leaving sum/step_targets.
                engine.backward(result.loss_sum * (world / step_targets), scale_wrt_gas=False)
                if clips_here and engine.is_gradient_accumulation_boundary():   # the step's gradient, all-reduced
                    grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), GRADIENT_CLIPPING)
                engine.step()
                sums += torch.tensor([result.loss_sum.item(), result.target_tokens, result.correct_tokens,
                                      int((batch.segment_ids >= 0).sum())], dtype=torch.float64)
            if world > 1:
                sums = all_reduce(sums)
            # The same on every rank (all-reduced), so every rank stops here together.
            loss = float(sums[0] / sums[1])
            grad_norm = float(grad_norm if clips_here else engine.get_global_grad_norm())
            ensure_finite(step, plan.total_steps, loss, grad_norm, last_checkpoint)
            if rank == 0:
                elapsed = time.monotonic() - started
                step_seconds = time.monotonic() - step_started
                remaining = elapsed / (step + 1 - start_step) * (plan.total_steps - step - 1)
                reporter.step_finished(StepReport(
                    step=step + 1, total_steps=plan.total_steps, epoch=_epochs_done(plan, step),
                    loss=loss, token_accuracy=float(sums[2] / sums[1]), grad_norm=grad_norm,
                    learning_rate=float(schedule.get_last_lr()[0]) if step + 1 < plan.total_steps else 0.0,
                    tokens=int(sums[3]), target_tokens=int(sums[1]),
                    tokens_per_second=float(sums[3]) / max(step_seconds, 1e-9), step_seconds=step_seconds,
                    estimated_end_time=datetime.now(timezone.utc) + timedelta(seconds=remaining),
                ))
            if is_checkpoint_step(plan, config.checkpoint_every, step):
                last_checkpoint = _checkpoint(engine, tokenizer, config, reporter, evaluation, publisher, step)
        publisher.finish()
    except BaseException:
        publisher.after_failure()   # a checkpoint written before the failure still completes when it can
        raise
    return TrainOutcome(final_checkpoint=last_checkpoint, steps_done=plan.total_steps, stopped=False)


def ensure_finite(step: int, total_steps: int, loss: float, grad_norm: float, last_checkpoint: Path | None) -> None:
    """Stop a run whose step (0-based) gave a loss or gradient that is not a number before anything of it is saved:
    its weights are now NaN or infinite, and every later step, checkpoint and the registered model would be too."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    kept = (f"the newest checkpoint, {last_checkpoint.name}, holds the weights before it: continue from it "
            "(custom_weights_path) with a lower learning_rate" if last_checkpoint else
            "no checkpoint was saved before it" + ("; the starting weights may hold NaN or infinite values"
                                                  if step == 0 else ": try a lower learning_rate"))
    raise TrainingDivergedError(f"training diverged at step {step + 1} of {total_steps}: loss {loss:g}, gradient "
                                f"norm {grad_norm:g}. Nothing of this step or after it was saved; {kept}")


def trial_step(model: Any, rows: PackedRows, device: torch.device) -> Callable[[int], None]:
    """A forward + backward of the first `count` rows that leaves no gradients behind (even when it fails). In
    training mode, as training will run it: a freshly loaded model is in evaluation mode, in which activation
    checkpointing does not engage and dropout keeps no masks, so a trial there would measure another memory."""
    trial = CausalLMLoss(model)

    def try_rows(count: int) -> None:
        training = model.training
        model.train()
        try:
            batch = make_batch(rows, np.arange(count) % len(rows), width_multiple=None).to(device)
            forward_loss(trial, batch).loss_sum.backward()
        finally:   # also after running out of memory halfway through the backward pass
            model.zero_grad(set_to_none=True)
            model.train(training)

    return try_rows


def _ready_model(model: Any, rows: PackedRows, device: torch.device, precision: str, stage: int,
                 compile_layers: bool) -> dict[str, Any]:
    """On a GPU: move the model there and compile its decoder layers if asked; then make sure its attention trains
    (ready_attention). Under ZeRO-3 the model was loaded as shards, which only DeepSpeed's engine can run: nothing
    can be tried before (hardware.choose_attention picks accordingly). Returns notes for MODEL_INITIALIZED."""
    notes: dict[str, Any] = {}
    if stage == 3:
        return {"compiled_layers": False}
    if device.type == "cuda":
        model.to(device, dtype=torch.bfloat16 if precision == BF16 else torch.float32)
        layers = getattr(getattr(model, getattr(model, "base_model_prefix", ""), None), "layers", None)
        notes["compiled_layers"] = bool(compile_layers and layers is not None)
        if notes["compiled_layers"]:
            # Layer by layer: every layer has the same code, so one compilation serves all (minutes less than
            # compiling the whole model), and the loss stays outside (it has its own chunked kernel).
            for layer in layers:
                layer.compile(dynamic=True)
    return {**notes, **ready_attention(model, rows, device)}


def ready_attention(model: Any, rows: PackedRows, device: torch.device) -> dict[str, Any]:
    """Make sure the attention implementation `model` was loaded with trains on `device`: FlexAttention compiles
    kernels that can fail on an unusual GPU or toolchain (and has no CPU backward at all); per-document SDPA must
    keep this model's documents apart exactly. If not, SDPA (or eager attention for a model without SDPA), which is
    exact too, with one pass per document on a CPU. Returns, after a fallback, why (the model's config says what it
    runs)."""
    attention = model.config._attn_implementation
    if attention in ("sdpa", "eager"):
        return {}
    try:
        if attention == DOCUMENT_SDPA:
            check_documents_apart(model)   # plain SDPA underneath: its backward needs no trial
        else:
            trial_step(model, rows, device)(1)
    except Exception as error:  # noqa: BLE001 - any failure of the faster kernel falls back to the exact default
        model.set_attn_implementation(plain_attention(model))
        return {"attention_fallback": f"{attention} failed ({one_line(error)[:200]})"}
    return {}


def fit_memory(model: Any, parameters: int, plan: TrainingPlan, rows: PackedRows, device: torch.device,
               precision: str, stage: int, checkpointing: str, cpu_budget: tuple[float, str] | None = None,
               micro_batch_tokens: int = 0) -> tuple[TrainingPlan, dict[str, Any]]:
    """The micro-batch and activation checkpointing (`checkpointing`: auto, on or off). ZeRO-2 GPUs grow the
    micro-batch while it fits and pays (memory.fit_micro_batch; at most `micro_batch_tokens` tokens, 0: any; always
    at least one row) and recompute activations only when not even one row fits without; under ZeRO-3 (a model that
    barely fits) one row at a time, recomputing activations; CPUs keep the plan's micro-batch and recompute
    activations when it would not fit `cpu_budget` (bytes, and where that figure comes from) otherwise. What a
    trainer and a dry run's probe (estimate.py, one process without a group) both work out."""
    recomputing = (checkpointing == "on" or (checkpointing == "auto" and device.type == "cuda" and stage == 3)) \
        and checkpoint_activations(model)
    fitted: dict[str, Any] = {}
    if device.type == "cuda" and stage < 3:
        fallback = (lambda: checkpoint_activations(model)) if checkpointing == "auto" else None
        plan, fitted = fit_micro_batch(plan, parameters, device, timed_trial(trial_step(model, rows, device), device),
                                       fallback, precision,
                                       micro_batch_rows_limit(micro_batch_tokens, rows.input_ids.shape[1]))
        recomputing = recomputing or fitted["activation_checkpointing"]
        # Every rank must split its rows alike, or their gradient reductions would not meet (a probe has no group).
        if plan.world_size > 1 and dist.is_initialized():
            plan = with_micro_batch(plan, int(all_reduce(torch.tensor([plan.micro_batch_rows]), "min")))
    elif cpu_budget is not None:
        fitted = fit_cpu(model, parameters, plan, rows, precision, checkpointing, cpu_budget)
        recomputing = recomputing or fitted["activation_checkpointing"]
    return plan, {**fitted, "activation_checkpointing": recomputing, "micro_batch_rows": plan.micro_batch_rows}


def fit_cpu(model: Any, parameters: int, plan: TrainingPlan, rows: PackedRows, precision: str, checkpointing: str,
            budget: tuple[float, str]) -> dict[str, Any]:
    """A CPU trainer's memory (what a trainer and a dry run both work out): its need against `budget` (bytes, and
    where that figure comes from), activations recomputed from here on when that is what fits. Returns
    {"memory": the figures, "activation_checkpointing": whether recomputing}; raises MemoryError when nothing fits.
    A model the probe cannot run trains unchecked, and the figures say why."""
    try:
        need = _cpu_need(model, parameters, plan, rows, precision, checkpointing, *budget)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a probe this model cannot run must not stop its training
        return {"memory": {"unknown": f"the probe failed ({one_line(error)[:200]})"},
                "activation_checkpointing": False}
    return {"memory": need.as_dict(), "activation_checkpointing": need.recomputing and checkpoint_activations(model)}


def cpu_memory_budget(limit_gb: float) -> tuple[float, str]:
    """Bytes a CPU trainer may take (RAY_FINETUNE_CPU_MEMORY_GB, else what the machine has available now, less the
    share Ray's memory monitor keeps free: beyond RAY_memory_usage_threshold of a node's memory it kills a worker),
    shared by the trainers of the group on this machine; and where the figure comes from, for an error message."""
    local = ranks_on_this_node()
    shared = f", shared by the {local} trainers on this node" if local > 1 else ""
    if limit_gb:
        return limit_gb * 2**30 / local, f"RAY_FINETUNE_CPU_MEMORY_GB={limit_gb:g}{shared}"
    total, available = host_memory()
    try:   # Ray's own setting (unset, or not a number Ray could use: Ray's default)
        threshold = min(1.0, max(0.0, float(os.environ.get("RAY_memory_usage_threshold", ""))))
    except ValueError:
        threshold = RAY_MEMORY_USAGE_THRESHOLD
    usable = max(0.0, available - (1 - threshold) * total)
    return usable / local, (f"{usable / 2**30:.1f} GiB available on this node below Ray's memory monitor's line, "
                            f"RAY_memory_usage_threshold={threshold:g}{shared}")


def _cpu_need(model: Any, parameters: int, plan: TrainingPlan, rows: PackedRows, precision: str, checkpointing: str,
               budget: float, budget_source: str) -> CpuMemoryNeed:
    """What a CPU trainer needs for this run (memory.fit_cpu_memory), from what the model keeps for the backward
    pass of two short probe rows made of the first row's tokens (one document each, every token a target)."""
    probe = CausalLMLoss(model)
    first_row = rows.input_ids[0]

    def saved_at(length: int) -> int:
        ids = torch.from_numpy(np.resize(first_row, length).astype(np.int64))[None]
        batch = Batch(input_ids=ids, labels=ids.clone(), position_ids=torch.arange(length)[None],
                      segment_ids=torch.zeros_like(ids))
        training = model.training
        model.train()   # as training will run it (dropout keeps its masks then)
        try:
            return saved_for_backward(lambda: forward_loss(probe, batch), model.parameters())
        finally:
            model.train(training)

    text = model.config.get_text_config()
    weight = next(model.parameters())
    tokens = plan.micro_batch_rows * rows.input_ids.shape[1]
    # The chunked loss holds one chunk of fp32 logits at a time (loss.py); the plain loss's logits are kept for the
    # backward pass, so the probe has counted them already.
    logits = min(tokens * text.vocab_size, CHUNK_LOGIT_ELEMENTS) * 4 if probe.split is not None else 0
    return fit_cpu_memory(
        parameters=parameters, precision=precision, activations=activation_bytes(saved_at), tokens=tokens,
        layers=text.num_hidden_layers, hidden_bytes=text.hidden_size * weight.element_size(), transient=logits,
        budget=budget, budget_source=budget_source,
        checkpointing=checkpointing if getattr(model, "supports_gradient_checkpointing", False) else "off",
        context_length=rows.input_ids.shape[1])


def _resumable_state(config: TrainConfig, layout: checkpoint.EngineLayout, node: FolderRole | None) -> Path | None:
    """The DeepSpeed state to resume from, for an engine of `layout` (on object storage, pulled to this node: the
    partitions of its ranks). ZeRO-1/2/3 save the optimizer state (ZeRO-3 also the weights) partitioned by rank; on
    a different number of workers (a requeued run placed on fewer or more GPUs), or under another layout (another
    ZeRO stage chosen for them, or set), it loads from the universal conversion, which rank 0 makes (and so alone
    pulls every rank's partition) and the other nodes pull."""
    if not config.resume_from:
        return None
    folder = storage.local(config.resume_from)
    state = checkpoint.read_state(folder)
    saved_world = int(state["plan"]["world_size"])
    same_ranks = saved_world == config.world_size
    saved = checkpoint.EngineLayout.saved(state) or layout   # not recorded (older checkpoints): taken to be this
    if saved == layout and (layout.zero_stage == 0 or same_ranks):
        checkpoint.pull_to_resume(folder, node.sharing if node and same_ranks else None)
        return folder
    if 0 in (saved.zero_stage, layout.zero_stage):
        raise CheckpointError(
            f"checkpoint {folder.name} holds DeepSpeed state of {saved} and this attempt trains under {layout}: "
            "DeepSpeed loads ZeRO-0 state under the same precision and ZeRO-0 only, and converts none into it. Set "
            "RAY_FINETUNE_ZERO_STAGE and RAY_FINETUNE_PRECISION as they were when it was written to resume the run, "
            f"or create a new run with custom_weights_path='{storage.location_of(folder)}' to start from its weights")
    failure, converted = "", None
    if config.rank == 0:
        try:
            converted = checkpoint.universal(folder)
        except Exception as error:  # noqa: BLE001 - every rank must learn it failed, or the others wait forever
            failure = one_line(error)
    if int(all_reduce(torch.tensor([1 if failure else 0]), "max")):
        raise CheckpointError(f"checkpoint {folder} was written by {saved_world} workers under {saved} and could not "
                              f"be converted to load on {config.world_size} under {layout}: {failure or 'see rank 0'}")
    return converted or checkpoint.universal(folder)   # the others: rank 0's conversion, this node's copy of it


def _epochs_done(plan: TrainingPlan, step: int) -> int:
    return plan.epoch_of(step) + int(plan.is_epoch_end(step))


def _agree(stop: int, uploading: bool, world: int) -> tuple[int, bool]:
    """What every rank learns at the same step boundary: rank 0's decision whether to stop, and whether any node's
    files of the checkpoint in flight are still going up (publishing.py)."""
    if world == 1:
        return stop, uploading
    agreed = all_reduce(torch.tensor([stop, int(uploading)], dtype=torch.int64), "max")
    return int(agreed[0]), bool(agreed[1])


def _checkpoint(engine: Any, tokenizer: Any, config: TrainConfig, reporter: Reporter, evaluation: Evaluation,
                publisher: Publisher, step: int) -> Path:
    epoch = _epochs_done(config.plan, step)
    if config.rank == 0:
        # The steps' events made durable before their checkpoint exists: a run interrupted after writing it (the
        # head gone before the events of its last steps reached the log) resumes after those steps and would never
        # report them again, leaving a hole in the loss curve.
        reporter.saving_checkpoint(step + 1)
    path = save_checkpoint(engine, tokenizer, config, publisher, epoch=epoch, step=step + 1)
    _evaluate(evaluation, config, reporter, step=step + 1, epoch=epoch)
    return path


def _report_published(reporter: Reporter, published: Published) -> None:
    reporter.checkpoint_saved(published)
    for removed in published.retention.removed:
        reporter.checkpoint_removed(storage.location_of(removed))


def _evaluate(evaluation: Evaluation, config: TrainConfig, reporter: Reporter, step: int, epoch: int) -> None:
    if evaluation.wanted:
        result = evaluation.run(seed=config.seed + step)   # every rank
        if config.rank == 0:
            reporter.evaluated(step, epoch, result)


def resume(engine: Any, folder: Path) -> int:
    """Load a complete checkpoint's engine state (weights, optimizer, schedule) and RNG; returns the next step."""
    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise CheckpointError(f"checkpoint {folder} could not be loaded by DeepSpeed")
    torch.set_rng_state(client_state["torch_rng"])
    np.random.set_state(client_state["numpy_rng"])
    if torch.cuda.is_available() and client_state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(client_state["cuda_rng"])
    return int(client_state["step"])


def save_checkpoint(engine: Any, tokenizer: Any, config: TrainConfig, publisher: Publisher, *, epoch: int,
                    step: int) -> Path:
    """All ranks write their DeepSpeed shards into a staging folder (on object storage: in their node's mirror);
    rank 0 adds the consolidated weights and the trainer state; then `publisher` completes it: at once on a shared
    folder, while training goes on on object storage. Returns the checkpoint's folder."""
    publisher.finish()   # the checkpoint before it complete first: one in flight at a time
    started = time.monotonic()
    name = checkpoint.checkpoint_name(epoch, step)
    staging = publisher.staging(name)
    client_state = {
        "epoch": epoch, "step": step, "seed": config.seed, "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    weights_state = master_weights(engine.module.lm, keep=config.rank == 0)   # collective: every rank takes part
    try:
        if config.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)   # left by an earlier, interrupted attempt
        _barrier(config.world_size)
        staging.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(staging.parent), tag=staging.name, save_latest=False, client_state=client_state)
        if config.rank == 0:
            weights = staging / checkpoint.WEIGHTS_DIR
            engine.module.lm.save_pretrained(weights, state_dict=weights_state)
            tokenizer.save_pretrained(weights)
            # Written last: its presence is what makes the checkpoint complete.
            checkpoint.write_state(staging, {"epoch": epoch, "step": step, "plan": config.plan.as_dict(),
                                             "deepspeed": asdict(checkpoint.EngineLayout(
                                                 engine.zero_optimization_stage(), engine.bfloat16_enabled())),
                                             "learning_rate": config.learning_rate,
                                             "packed_data": packed_data_id(config.train_rows_path)})
        _barrier(config.world_size)   # every rank's files are written
        publisher.start(name, epoch, step, write_seconds=time.monotonic() - started)
    except OSError as error:
        if config.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {name} under {staging.parent}: {error.strerror or error} "
                              "(earlier checkpoints are intact)") from error
    return publisher.directory / name


def master_weights(module: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The module's weights as the optimizer holds them: under bf16 the fp32 master copies (what training has
    learned, not its bf16 rounding), which continued training, evaluation and registration then start from.
    Every rank must call it (the masters of ZeRO-partitioned parameters are gathered from all ranks); only the
    rank that writes them (`keep`) holds a host copy."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for parameter in module.parameters():
        full = safe_get_full_fp32_param(parameter)
        if full is not None and keep:
            masters[id(parameter)] = full.detach().to("cpu", torch.float32)
    if not keep:
        return {}
    return {name: masters.get(id(value), value.detach())
            for name, value in module.state_dict(keep_vars=True).items()}


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
