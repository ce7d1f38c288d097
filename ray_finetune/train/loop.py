"""The training loop: one explicit loop around a DeepSpeed engine (accumulate, clip, step, report, checkpoint).

Runs on every rank of an initialized torch.distributed group. The loss of a step is the mean over *all* target
tokens of that step, across micro-batches and ranks: each micro-batch contributes its summed token loss divided by
the step's total target count (known in advance from the plan), so short and long rows weigh what their tokens
weigh, whatever the world size.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ray_finetune.data.packing import PackedRows
from ray_finetune.train import checkpoint
from ray_finetune.errors import CheckpointError
from ray_finetune.spec import Duration
from ray_finetune.train.models import load_initial_model, load_tokenizer
from ray_finetune.train.plan import EMPTY_ROW, TrainingPlan
from ray_finetune.train.schedule import lr_factor
from ray_finetune.train.step import forward_loss, make_batch

BETAS = (0.9, 0.95)
GRADIENT_CLIPPING = 1.0


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
    def checkpoint_saved(self, path: str, epoch: int, step: int) -> None: ...
    def checkpoint_removed(self, path: str) -> None: ...
    def stop_requested(self) -> int: ...   # STOP_NONE, STOP or STOP_AND_CHECKPOINT


def device_for_rank(rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def deepspeed_config(plan: TrainingPlan, on_gpu: bool) -> dict[str, Any]:
    """ZeRO-2 on GPUs (bf16 with fp32 master weights, sharded optimizer state); on CPU ZeRO stage 0, which keeps
    the same engine and gradient all-reduce but skips the partition bookkeeping that costs ~1 s a step there
    (measured: BENCHMARKS.md)."""
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_rows,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.global_batch_rows,
        "gradient_clipping": GRADIENT_CLIPPING,
        "zero_optimization": {"stage": 2 if on_gpu else 0},
        "bf16": {"enabled": on_gpu},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


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
    device = device_for_rank(rank)
    rows = PackedRows.load(config.train_rows_path)
    tokenizer = load_tokenizer(config.model_path)
    model = load_initial_model(config.model_path, config.init_weights_path)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=BETAS, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, plan.total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(plan, on_gpu=device.type == "cuda"),
    )
    start_step = 0
    if config.resume_from:
        start_step = resume(engine, Path(config.resume_from))
    if rank == 0:
        reporter.model_initialized({
            "parameters": sum(p.numel() for p in model.parameters()), "device": str(device),
            "dtype": "bfloat16" if device.type == "cuda" else "float32", "world_size": world,
            "weights_from": config.resume_from or config.init_weights_path or config.model_path,
            "resumed_at_step": start_step, "pid": os.getpid(),
        })
    engine.train()
    started = time.monotonic()
    last_checkpoint: Path | None = Path(config.resume_from) if config.resume_from else None
    for step in range(start_step, plan.total_steps):
        stop = _agreed_stop(reporter.stop_requested() if rank == 0 else STOP_NONE, world)
        if stop != STOP_NONE:
            already_saved = last_checkpoint is not None and checkpoint.parse_name(last_checkpoint.name)[1] == step
            if stop == STOP_AND_CHECKPOINT and step > 0 and not already_saved:
                last_checkpoint = _checkpoint(engine, tokenizer, config, reporter, step - 1)
            return TrainOutcome(final_checkpoint=last_checkpoint, steps_done=step, stopped=True)
        step_started = time.monotonic()
        all_rows = plan.step_rows(step)
        step_targets = rows.target_tokens(all_rows[all_rows != EMPTY_ROW])
        sums = torch.zeros(4, dtype=torch.float64)   # loss, targets, correct, real tokens (this rank)
        for micro_rows in plan.rank_micro_batches(step, rank):
            batch = make_batch(rows, micro_rows).to(device)
            result = forward_loss(engine, batch)
            # DeepSpeed averages gradients over ranks; multiplying by world undoes that, leaving sum/step_targets.
            engine.backward(result.loss_sum * (world / step_targets), scale_wrt_gas=False)
            engine.step()
            sums += torch.tensor([result.loss_sum.item(), result.target_tokens, result.correct_tokens,
                                  int((batch.segment_ids >= 0).sum())], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
        if rank == 0:
            elapsed = time.monotonic() - started
            step_seconds = time.monotonic() - step_started
            remaining = elapsed / (step + 1 - start_step) * (plan.total_steps - step - 1)
            reporter.step_finished(StepReport(
                step=step + 1, total_steps=plan.total_steps, epoch=_epochs_done(plan, step),
                loss=float(sums[0] / sums[1]), token_accuracy=float(sums[2] / sums[1]),
                learning_rate=float(schedule.get_last_lr()[0]) if step + 1 < plan.total_steps else 0.0,
                tokens=int(sums[3]), target_tokens=int(sums[1]),
                tokens_per_second=float(sums[3]) / max(step_seconds, 1e-9), step_seconds=step_seconds,
                estimated_end_time=datetime.now(timezone.utc) + timedelta(seconds=remaining),
            ))
        if is_checkpoint_step(plan, config.checkpoint_every, step):
            last_checkpoint = _checkpoint(engine, tokenizer, config, reporter, step)
    return TrainOutcome(final_checkpoint=last_checkpoint, steps_done=plan.total_steps, stopped=False)


def _epochs_done(plan: TrainingPlan, step: int) -> int:
    return plan.epoch_of(step) + int(plan.is_epoch_end(step))


def _agreed_stop(local: int, world: int) -> int:
    """Rank 0 decides; every rank learns the decision at the same step boundary."""
    if world == 1:
        return local
    decision = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(decision, op=dist.ReduceOp.MAX)
    return int(decision.item())


def _checkpoint(engine: Any, tokenizer: Any, config: TrainConfig, reporter: Reporter, step: int) -> Path:
    epoch = _epochs_done(config.plan, step)
    path = save_checkpoint(engine, tokenizer, config, epoch=epoch, step=step + 1)
    if config.rank == 0:
        reporter.checkpoint_saved(str(path), epoch, step + 1)
        for removed in checkpoint.retain(path.parent, config.checkpoints_to_keep):
            reporter.checkpoint_removed(str(removed))
    return path


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


def save_checkpoint(engine: Any, tokenizer: Any, config: TrainConfig, *, epoch: int, step: int) -> Path:
    """All ranks write their DeepSpeed shards into a staging folder; rank 0 adds the consolidated weights and the
    trainer state, then publishes it (rename + pointer). Returns the published folder."""
    directory = checkpoint.checkpoints_dir(config.save_folder, config.run_name)
    name = checkpoint.checkpoint_name(epoch, step)
    staging = directory / checkpoint.staging_name(name)
    client_state = {
        "epoch": epoch, "step": step, "seed": config.seed, "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    try:
        if config.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)   # left by an earlier, interrupted attempt
            staging.mkdir(parents=True)
        _barrier(config.world_size)
        engine.save_checkpoint(str(directory), tag=staging.name, save_latest=False, client_state=client_state)
        if config.rank == 0:
            weights = staging / checkpoint.WEIGHTS_DIR
            engine.module.save_pretrained(weights)
            tokenizer.save_pretrained(weights)
            # Written last: its presence is what makes the checkpoint complete.
            checkpoint.write_state(staging, {"epoch": epoch, "step": step, "plan": config.plan.as_dict(),
                                             "learning_rate": config.learning_rate})
            checkpoint.publish(directory, name)
    except OSError as error:
        if config.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {name} under {directory}: {error.strerror or error} "
                              "(earlier checkpoints are intact)") from error
    _barrier(config.world_size)
    return directory / name


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
