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
    empty = indices == EMPTY_ROW

    def gather(array: np.ndarray, empty_value: int | None = None) -> torch.Tensor:
        picked = array[real].astype(np.int64)   # rows are stored as int32; models take int64 ids and labels
        if empty_value is not None:
            picked[empty] = empty_value
        return torch.from_numpy(picked)

    return Batch(gather(rows.input_ids), gather(rows.labels, IGNORE_INDEX), gather(rows.position_ids),
                 gather(rows.segment_ids, -1))


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


def forward_loss(model: torch.nn.Module, batch: Batch, per_document: bool | None = None) -> LossSums:
    """Summed token loss of packed rows, documents kept apart.

    Two exact ways: on CPU each document runs as its own sequence (plain causal attention over L tokens instead of
    a masked L_row x L_row attention, and no mask to build); elsewhere the whole row runs at once with a
    document-blocked attention mask. Both give the same loss as training the examples one by one (a test)."""
    if per_document is None:
        per_document = batch.input_ids.device.type == "cpu"
    if per_document:
        return _per_document_loss(model, batch)
    output = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids,
        attention_mask=document_attention_mask(batch.segment_ids), use_cache=False,
    )
    return _token_loss(output.logits, batch.labels)


def _per_document_loss(model: torch.nn.Module, batch: Batch) -> LossSums:
    total: LossSums | None = None
    for row in range(batch.input_ids.shape[0]):
        segments = batch.segment_ids[row]
        starts = torch.nonzero(torch.diff(segments, prepend=segments.new_tensor([-2]))).flatten().tolist()
        for start, end in zip(starts, starts[1:] + [segments.shape[0]]):
            if int(segments[start]) < 0:
                continue   # padding
            output = model(input_ids=batch.input_ids[row:row + 1, start:end],
                           position_ids=batch.position_ids[row:row + 1, start:end], use_cache=False)
            part = _token_loss(output.logits, batch.labels[row:row + 1, start:end])
            total = part if total is None else LossSums(total.loss_sum + part.loss_sum,
                                                        total.target_tokens + part.target_tokens,
                                                        total.correct_tokens + part.correct_tokens)
    if total is None:   # a row of padding only (the empty rows that fill an epoch's last step)
        zero = sum(p.sum() for p in model.parameters()) * 0.0
        return LossSums(loss_sum=zero, target_tokens=0, correct_tokens=0)
    return total


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> LossSums:
    logits = logits.float()
    flat_logits, flat_labels = logits.view(-1, logits.shape[-1]), labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    targets = flat_labels != IGNORE_INDEX
    with torch.no_grad():
        correct = int((flat_logits.argmax(-1)[targets] == flat_labels[targets]).sum())
    return LossSums(loss_sum=loss_sum, target_tokens=int(targets.sum()), correct_tokens=correct)
