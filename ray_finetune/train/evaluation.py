"""Scoring the weights being trained on the eval data, by the trainers themselves: on their devices, in their
precision, with their shards (a model that needs several GPUs to train needs them to be scored too). The loop
scores before the first step (when asked) and at every checkpoint; the evaluator actor records the scores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ray_finetune.data.packing import PackedRows
from ray_finetune.train.distributed import all_reduce
from ray_finetune.train.plan import EMPTY_ROW, TrainingPlan
from ray_finetune.train.step import forward_loss, make_batch


@dataclass(frozen=True)
class EvalScores:
    loss: float              # mean over all target tokens of the eval rows
    token_accuracy: float


@dataclass(frozen=True)
class Evaluation:
    """The eval loss and token accuracy of a DeepSpeed engine's weights over all eval rows. Rank r scores rows r,
    r + world, ...; every rank runs the same number of forward passes, padded with empty rows (under ZeRO-3 each
    forward gathers weights from all ranks). Every rank must call `run`."""
    engine: Any
    rows: PackedRows | None
    plan: TrainingPlan
    rank: int
    world: int
    device: torch.device
    per_document: bool | None

    def run(self) -> EvalScores | None:
        if self.rows is None:
            return None
        per_rank = -(-len(self.rows) // self.world)
        mine = np.arange(self.rank, per_rank * self.world, self.world)
        mine[mine >= len(self.rows)] = EMPTY_ROW
        sums = torch.zeros(3, dtype=torch.float64)   # loss, targets, correct
        self.engine.eval()
        try:
            with torch.no_grad():
                for start in range(0, per_rank, self.plan.micro_batch_rows):
                    batch = make_batch(self.rows, mine[start:start + self.plan.micro_batch_rows]).to(self.device)
                    result = forward_loss(self.engine, batch, self.per_document)
                    sums += torch.tensor([float(result.loss_sum), result.target_tokens, result.correct_tokens],
                                         dtype=torch.float64)
        finally:
            self.engine.train()
        if self.world > 1:
            sums = all_reduce(sums)
        targets = max(float(sums[1]), 1.0)
        return EvalScores(loss=float(sums[0]) / targets, token_accuracy=float(sums[2]) / targets)
