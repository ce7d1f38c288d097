"""One forward pass over packed rows: the document-blocked attention mask and the summed token loss."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ray_finetune.data.packing import IGNORE_INDEX, PackedRows
from ray_finetune.train.plan import EMPTY_ROW


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.labels, self.position_ids, self.segment_ids)))


def make_batch(rows: PackedRows, indices: np.ndarray) -> Batch:
    """Rows by index; EMPTY_ROW becomes a row of padding with nothing to learn."""
    real = np.where(indices == EMPTY_ROW, 0, indices)
    labels = rows.labels[real].copy()
    segments = rows.segment_ids[real].copy()
    labels[indices == EMPTY_ROW] = IGNORE_INDEX
    segments[indices == EMPTY_ROW] = -1
    return Batch(
        torch.from_numpy(rows.input_ids[real]), torch.from_numpy(labels),
        torch.from_numpy(rows.position_ids[real]), torch.from_numpy(segments),
    )


def document_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean: causal, within one document only. Padding attends to itself alone so that no row of
    the mask is empty (an empty row makes SDPA return NaN); padding has no labels, so it never reaches the loss."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same_document = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids >= 0)[:, :, None]
    eye = torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return ((same_document & causal & real) | eye)[:, None]


@dataclass
class LossSums:
    loss_sum: torch.Tensor       # differentiable sum of token losses
    target_tokens: int
    correct_tokens: int


def forward_loss(model: torch.nn.Module, batch: Batch) -> LossSums:
    output = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids,
        attention_mask=document_attention_mask(batch.segment_ids), use_cache=False,
    )
    logits = output.logits.float()
    flat_logits, flat_labels = logits.view(-1, logits.shape[-1]), batch.labels.view(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    targets = flat_labels != IGNORE_INDEX
    with torch.no_grad():
        correct = int((flat_logits.argmax(-1)[targets] == flat_labels[targets]).sum())
    return LossSums(loss_sum=loss_sum, target_tokens=int(targets.sum()), correct_tokens=correct)
