"""One forward pass over packed rows: batches of rows, documents kept apart, and the summed token loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ray_finetune.data.packing import IGNORE_INDEX, PackedRows
from ray_finetune.train.attention import DOCUMENT_SDPA, document_boundaries, document_spans, packed_arguments
from ray_finetune.train.loss import LossSums, linear_cross_entropy, split_head, token_loss
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


def make_batch(rows: PackedRows, indices: np.ndarray, width_multiple: int | None = 1) -> Batch:
    """Rows by index; EMPTY_ROW becomes a row of padding with nothing to learn. The padding that ends every row
    of the batch is cut off (its tokens come after all of their rows' documents, so causal attention never lets
    them change a real token's loss), leaving a width that is a multiple of `width_multiple`
    (hardware.batch_width_multiple); None keeps whole rows, the widest batch training can meet."""
    real = np.where(indices == EMPTY_ROW, 0, indices)
    empty = indices == EMPTY_ROW
    width = rows.input_ids.shape[1]
    if width_multiple is not None:
        used_columns = np.flatnonzero((rows.segment_ids[real[~empty]] >= 0).any(axis=0))
        used = int(used_columns[-1]) + 1 if used_columns.size else 0
        width = min(width, max(1, -(-used // width_multiple)) * width_multiple)

    def gather(array: np.ndarray, empty_value: int | None = None) -> torch.Tensor:
        picked = array[real, :width].astype(np.int64)   # rows are stored as int32; models take int64 ids and labels
        if empty_value is not None:
            picked[empty] = empty_value
        return torch.from_numpy(picked)

    return Batch(gather(rows.input_ids), gather(rows.labels, IGNORE_INDEX), gather(rows.position_ids),
                 gather(rows.segment_ids, -1))


class CausalLMLoss(torch.nn.Module):
    """A causal LM and its token loss as one module, so that what DeepSpeed wraps returns the loss itself (its
    backward bookkeeping hangs on the returned tensor) and the output layer can run chunked (loss.py) instead of
    returning full logits. `lm` is the Hugging Face model; the state dict is exactly the model's, so checkpoints
    hold plain Hugging Face parameter names."""

    def __init__(self, lm: torch.nn.Module, probe: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.split = split_head(lm) if probe else None

    def probe_split(self) -> None:
        """Whether the chunked loss applies (loss.split_head runs the model once). For a ZeRO-3 model, whose
        weights are shards from loading on: after DeepSpeed wraps this module, when its hooks gather each layer as
        the probe runs it."""
        self.split = split_head(self.lm)

    def borrowed_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters this module's forward reads directly rather than by calling the module that owns them (the
        chunked loss multiplies by the output layer's weight); ZeRO-3 must gather them for this module's forward
        and backward passes."""
        return [self.split.head.weight] if self.split is not None else []

    @property
    def attends_per_document(self) -> bool:
        """Whether the model runs attention.DOCUMENT_SDPA, which takes the documents' boundaries."""
        return getattr(self.lm.config, "_attn_implementation", None) == DOCUMENT_SDPA

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                segment_ids: torch.Tensor | None = None,
                one_pass_per_document: bool = False) -> tuple[torch.Tensor, int, int]:
        """Summed token loss, target tokens and correct tokens. With `segment_ids`, the model runs whole rows and
        is told where each document starts (attention.DOCUMENT_SDPA); with `one_pass_per_document` as well, each
        document runs as its own sequence instead (plain causal attention over its tokens), padding skipped."""
        if one_pass_per_document:
            return self._one_pass_per_document(input_ids, position_ids, labels, segment_ids)
        # No attention mask and no cache: that is when transformers reads restarting position ids as packed documents.
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        if segment_ids is not None:
            inputs.update(packed_arguments(segment_ids))
        if self.split is None:
            sums = token_loss(self.lm(**inputs).logits, labels)
        else:
            sums = linear_cross_entropy(self.split.base(**inputs).last_hidden_state, self.split.head.weight, labels)
        return sums.loss_sum, sums.target_tokens, sums.correct_tokens

    def _one_pass_per_document(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                               segment_ids: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        spans = [(row, first, end) for row, first, end in
                 document_spans(document_boundaries(segment_ids).tolist(), segment_ids.shape[1])
                 if int(segment_ids[row, first]) >= 0]
        if not spans:   # a row of padding only (the empty rows that fill an epoch's last step)
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return zero, 0, 0

        def part(row: int, first: int, end: int) -> dict[str, Any]:
            return {"input_ids": input_ids[row:row + 1, first:end], "position_ids": position_ids[row:row + 1, first:end],
                    "use_cache": False}

        if self.split is not None:
            # One loss over the hidden states of all documents: the output layer's [vocabulary x hidden] gradient is
            # formed once per micro-batch, not kept once per document until the backward pass.
            hidden = torch.cat([self.split.base(**part(*span)).last_hidden_state for span in spans], dim=1)
            targets = torch.cat([labels[row:row + 1, first:end] for row, first, end in spans], dim=1)
            sums = linear_cross_entropy(hidden, self.split.head.weight, targets)
            return sums.loss_sum, sums.target_tokens, sums.correct_tokens
        totals = [token_loss(self.lm(**part(row, first, end)).logits, labels[row:row + 1, first:end])
                  for row, first, end in spans]
        return (torch.stack([t.loss_sum for t in totals]).sum(), sum(t.target_tokens for t in totals),
                sum(t.correct_tokens for t in totals))

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.lm.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.lm.load_state_dict(state_dict, strict=strict, assign=assign)


def per_document_for(sharded: bool) -> bool | None:
    """How forward_loss may run a ZeRO-3-sharded model: it gathers each layer's weights from all ranks whenever the
    layer runs, so every rank must run the same modules the same number of times -- whole rows, not one forward per
    document (their number differs by rank). Otherwise the device decides (None)."""
    return False if sharded else None


def forward_loss(model: torch.nn.Module, batch: Batch, per_document: bool | None = None) -> LossSums:
    """Summed token loss of packed rows, documents kept apart. `model` is a CausalLMLoss or a DeepSpeed engine
    around one.

    Three exact ways. A model running attention.DOCUMENT_SDPA (the CPU default) runs whole rows and is told where
    each document starts; its attention runs per document. Otherwise, on CPU, each document runs as its own
    sequence (plain causal attention over L tokens instead of a masked L_row x L_row attention). Elsewhere the
    whole row runs at once, and the model keeps documents apart by their position ids, which restart at 0 with
    every document: with no attention mask given, transformers reads such rows as packed sequences and attends
    within each only (varlen FlashAttention, a FlexAttention block mask, or a document-blocked SDPA/eager mask,
    whichever the model runs). All give the same loss as training the examples one by one (tests, for each)."""
    if getattr(model, "module", model).attends_per_document:
        return LossSums(*model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels,
                               segment_ids=batch.segment_ids))
    if per_document is None:
        per_document = batch.input_ids.device.type == "cpu"
    return LossSums(*model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels,
                           segment_ids=batch.segment_ids if per_document else None,
                           one_pass_per_document=per_document))
