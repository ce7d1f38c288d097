"""The training plan: batch size (chosen here, never by the user), steps per epoch, total steps, and which packed
rows each rank reads at each step. Deterministic from the seed, so every rank, and a resumed run, agrees."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ray_finetune.spec import Duration

# The global batch leaves at least this many optimizer steps an epoch (one row a step at the least), so that a small
# dataset still takes enough steps to learn from at the default learning rate; only data of more than
# TARGET_STEPS_PER_EPOCH x MAX_GLOBAL_BATCH_ROWS rows gets fewer steps, of full batches. On 78 rows of real chats, one
# epoch at 5e-6 lowered SmolLM2's eval loss by 0.42 in 78 steps of one row, 0.36 in 39 of two and 0.23 in 10 of eight,
# at the same compute (bench/batch_policy.py, BENCHMARKS.md).
TARGET_STEPS_PER_EPOCH = 64
MAX_GLOBAL_BATCH_ROWS = 64
EMPTY_ROW = -1  # pads the last step of an epoch; contributes no loss


@dataclass(frozen=True)
class TrainingPlan:
    rows: int
    world_size: int
    global_batch_rows: int
    micro_batch_rows: int
    gradient_accumulation_steps: int
    steps_per_epoch: int
    total_steps: int
    seed: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def is_epoch_end(self, step: int) -> bool:
        """True after optimizer step `step` (0-based) completes an epoch."""
        return (step + 1) % self.steps_per_epoch == 0

    def step_rows(self, step: int) -> np.ndarray:
        """Row indices of the whole step (all ranks); EMPTY_ROW pads the last step of an epoch."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng(self.seed + epoch).permutation(self.rows)
        chosen = order[index * self.global_batch_rows:(index + 1) * self.global_batch_rows]
        return np.concatenate([chosen, np.full(self.global_batch_rows - len(chosen), EMPTY_ROW, dtype=np.int64)])

    def rank_micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        per_rank = self.global_batch_rows // self.world_size
        mine = self.step_rows(step)[rank * per_rank:(rank + 1) * per_rank]
        return [mine[i:i + self.micro_batch_rows] for i in range(0, per_rank, self.micro_batch_rows)]


def trainer_group_size(gpus: int, device: str, requested: int, concurrent_runs: int) -> tuple[int, bool]:
    """A run's trainer workers and whether each takes a GPU, on a cluster with `gpus` GPUs now. `device`
    (RAY_FINETUNE_TRAINER_DEVICE) "gpu" or "cpu" says which; "auto" follows the GPUs the cluster has now. A cluster
    that starts GPU nodes on demand (cluster.yaml) has none until a run asks: there "gpu" makes the trainers'
    placement wait for the GPU nodes the autoscaler then starts, instead of training on the head's CPUs."""
    on_gpus = device == "gpu" or (device == "auto" and gpus > 0)
    return trainer_world_size(gpus if on_gpus else 0, requested, concurrent_runs), on_gpus


def trainer_world_size(gpus: int, requested: int, concurrent_runs: int) -> int:
    """Trainer workers of a run. GPUs: one worker per GPU, each of the runs that may train at once getting an equal
    share of the cluster's GPUs (all of them by default), `requested` capping it. CPU, or GPUs not up yet:
    `requested` (default 1)."""
    if not gpus:
        return requested or 1
    share = max(1, gpus // max(1, concurrent_runs))
    return min(share, requested) if requested else share


def choose_global_batch_rows(rows: int, world_size: int) -> int:
    """The largest power of two, up to MAX_GLOBAL_BATCH_ROWS, that leaves at least TARGET_STEPS_PER_EPOCH steps an
    epoch; at least one row per rank."""
    batch = 1
    while batch * 2 <= min(MAX_GLOBAL_BATCH_ROWS, max(1, rows // TARGET_STEPS_PER_EPOCH)):
        batch *= 2
    return math.ceil(max(batch, world_size) / world_size) * world_size


def continued_plan(saved: dict[str, int], world_size: int) -> TrainingPlan:
    """The plan a checkpoint was trained under (its trainer state holds it), continued on up to `world_size` workers:
    the same global batch, steps and row order, so a run resumed on more or fewer devices, or by a version that
    chooses batches differently, goes on as it began. Each step's rows are split over the workers anew; a batch that
    does not split evenly over `world_size` takes the most workers it does split over (one row: one worker)."""
    batch = int(saved["global_batch_rows"])
    world = max(count for count in range(1, max(1, world_size) + 1) if batch % count == 0)
    return TrainingPlan(rows=int(saved["rows"]), world_size=world, global_batch_rows=batch, micro_batch_rows=1,
                        gradient_accumulation_steps=batch // world, steps_per_epoch=int(saved["steps_per_epoch"]),
                        total_steps=int(saved["total_steps"]), seed=int(saved["seed"]))


def make_plan(*, rows: int, tokens: int, duration: Duration, world_size: int, micro_batch_rows: int = 1,
              seed: int, global_batch_rows: int | None = None) -> TrainingPlan:
    """The plan for `rows` packed rows; the batch is choose_global_batch_rows' unless `global_batch_rows` (a
    multiple of `world_size`) says otherwise (bench/batch_policy.py weighs the choice against others)."""
    if rows == 0:
        raise ValueError("no training rows after packing")
    global_batch = global_batch_rows or choose_global_batch_rows(rows, world_size)
    per_rank = global_batch // world_size
    micro = max(1, min(micro_batch_rows, per_rank))
    while per_rank % micro:
        micro -= 1
    steps_per_epoch = math.ceil(rows / global_batch)
    if duration.unit == "ep":
        total = duration.value * steps_per_epoch
    elif duration.unit == "ba":
        total = duration.value
    else:
        tokens_per_step = max(1.0, tokens / steps_per_epoch)
        total = max(1, math.ceil(duration.value / tokens_per_step))
    return TrainingPlan(
        rows=rows, world_size=world_size, global_batch_rows=global_batch, micro_batch_rows=micro,
        gradient_accumulation_steps=per_rank // micro, steps_per_epoch=steps_per_epoch, total_steps=total, seed=seed,
    )
