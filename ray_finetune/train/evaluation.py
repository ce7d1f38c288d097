"""Evaluating the weights being trained, by the trainers themselves: the eval loss and token accuracy over the eval
data, and a sample for each eval prompt -- on their devices, in their precision, with their shards (a model that
needs several GPUs to train needs them to be evaluated too). The loop evaluates before the first step (when asked)
and at every checkpoint; the evaluator actor records the results."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ray_finetune.data.packing import PackedRows
from ray_finetune.errors import one_line
from ray_finetune.train.distributed import all_reduce
from ray_finetune.train.hardware import batch_width_multiple
from ray_finetune.train.plan import EMPTY_ROW, TrainingPlan
from ray_finetune.train.step import forward_loss, make_batch, per_document_for

# SPEC §2: how eval prompts are sampled.
SAMPLING = {"max_new_tokens": 100, "do_sample": True, "temperature": 1.0, "top_k": 50, "top_p": 0.95}


@dataclass(frozen=True)
class EvalResult:
    loss: float | None = None             # mean over all target tokens of the eval rows; None without eval data
    token_accuracy: float | None = None
    generations: list[dict[str, str]] = field(default_factory=list)   # {"prompt", "generation"} per eval prompt


def prompt_text(tokenizer: Any, task_type: str, prompt: str) -> str:
    """An eval prompt as the model sees it in training: a chat model's user turn under its template."""
    if task_type == "CHAT_COMPLETION" and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@dataclass(frozen=True)
class Evaluation:
    """What a run evaluates, bound to its DeepSpeed engine. Every rank must call `run`, at the same step."""
    engine: Any
    rows: PackedRows | None       # eval data, packed
    prompts: list[str]            # eval prompts
    tokenizer: Any
    task_type: str
    plan: TrainingPlan
    rank: int
    world: int
    device: torch.device
    sharded: bool                 # ZeRO-3: every forward gathers weights from all ranks

    @property
    def wanted(self) -> bool:
        return self.rows is not None or bool(self.prompts)

    def run(self, seed: int) -> EvalResult:
        self.engine.eval()
        try:
            with torch.no_grad():
                loss, accuracy = self._scores() if self.rows is not None else (None, None)
                generations = self._generations(seed) if self.prompts else []
        finally:
            self.engine.train()
        return EvalResult(loss=loss, token_accuracy=accuracy, generations=generations)

    def _scores(self) -> tuple[float, float]:
        """Rank r scores rows r, r + world, ...; every rank runs the same number of forward passes, padded with
        empty rows (their weight gathers under ZeRO-3 must meet)."""
        per_rank = -(-len(self.rows) // self.world)
        mine = np.arange(self.rank, per_rank * self.world, self.world)
        mine[mine >= len(self.rows)] = EMPTY_ROW
        sums = torch.zeros(3, dtype=torch.float64)   # loss, targets, correct
        for start in range(0, per_rank, self.plan.micro_batch_rows):
            batch = make_batch(self.rows, mine[start:start + self.plan.micro_batch_rows],
                               batch_width_multiple(self.device)).to(self.device)
            result = forward_loss(self.engine, batch, per_document_for(self.sharded))
            sums += torch.tensor([float(result.loss_sum), result.target_tokens, result.correct_tokens],
                                 dtype=torch.float64)
        if self.world > 1:
            sums = all_reduce(sums)
        targets = max(float(sums[1]), 1.0)
        return float(sums[0]) / targets, float(sums[2]) / targets

    def _generations(self, seed: int) -> list[dict[str, str]]:
        """Every rank samples every prompt alike (same seed, same weights); under ZeRO-3 in lockstep until all are
        done. Training's random state is left as it was: a run resumed from a checkpoint must draw what the
        uninterrupted run draws."""
        model, tokenizer = self.engine.module.lm, self.tokenizer
        rows = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for prompt in self.prompts:
                torch.manual_seed(seed)
                encoded = tokenizer(prompt_text(tokenizer, self.task_type, prompt), return_tensors="pt",
                                    add_special_tokens=False).to(self.device)
                try:
                    output = model.generate(**encoded, **SAMPLING, pad_token_id=tokenizer.pad_token_id,
                                            eos_token_id=model.generation_config.eos_token_id,
                                            synced_gpus=self.sharded)
                    text = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
                except Exception as error:  # noqa: BLE001 - a sample is not worth a run: say why it is missing
                    text = f"[generation failed: {one_line(error)[:300]}]"
                rows.append({"prompt": prompt, "generation": text.strip()})
        return rows
