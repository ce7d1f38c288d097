"""Attention over packed rows that runs scaled-dot-product attention once per document.

A packed row holds several documents that must never see each other. Run as one sequence, that takes a
block-diagonal mask, and SDPA then computes (and on a CPU, cannot skip) the whole row x row score matrix; run as one
forward pass per document (step.forward_loss's fallback), every linear layer multiplies a few hundred tokens at a
time instead of a whole row and every weight gradient is summed over the passes. This implementation runs the
whole row through the model and splits only the attention: each document attends causally within itself,
with no mask to build. On a 2-core CPU, forward + backward of a SmolLM2-135M row of three documents runs 1.17x as
fast as one pass per document, with the same loss and gradients; a whole run 1.16x (1.34x for a 1M-parameter test
model; BENCHMARKS.md).

The documents arrive as transformers' packed-sequence arguments (`cu_seq_lens_q`/`cu_seq_lens_k`, the cumulative
document lengths over the flattened batch), which models hand down to their attention. Without them (generation,
serving, anything but a training step) it is plain SDPA with transformers' own masks, so a model set to it
behaves as an SDPA model everywhere else. Nothing of it is saved: transformers does not write the attention
implementation into a checkpoint's config.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# Not "sdpa_...": transformers would then apply its SDPA checks when loading a model with it, and refuse the models
# it has no SDPA for; check_documents_apart refuses them instead, and training falls back to plain_attention.
DOCUMENT_SDPA = "per_document"

# Arguments transformers passes along that do not change what attention computes.
_NEUTRAL = {"position_ids", "use_cache", "cache_position", "output_attentions", "max_length_q", "max_length_k",
            "position_embeddings"}


class DocumentAttentionUnsupported(NotImplementedError):
    """The model's attention does something this implementation does not (soft-capping, attention sinks,
    bidirectional attention): training falls back to one forward pass per document."""


def document_boundaries(segment_ids: torch.Tensor) -> torch.Tensor:
    """cu_seq_lens of rows [B, T] flattened: where each document starts, and the end. Every row starts a new
    document, and the padding after a row's last document counts as one (its tokens have no labels)."""
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::segment_ids.shape[-1]] = True
    positions = torch.nonzero(starts).flatten()
    return torch.cat([positions, positions.new_tensor([flat.numel()])]).to(torch.int32)


def document_spans(boundaries: list[int], length: int) -> Iterator[tuple[int, int, int]]:
    """(row, first, end) of each document between `boundaries` (document_boundaries), in rows of `length`."""
    for start, end in zip(boundaries, boundaries[1:]):
        yield start // length, start % length, start % length + (end - start)


def packed_arguments(segment_ids: torch.Tensor) -> dict[str, Any]:
    """What a model's forward pass takes to run this implementation's per-document attention."""
    boundaries = document_boundaries(segment_ids)
    return {"cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries}


def _document_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                   sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    # cu_seq_lens_k is cu_seq_lens_q (self-attention over the same rows); named so that it is not taken for an
    # argument this implementation does not know.
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    causal = kwargs.pop("is_causal", None) is not False and getattr(module, "is_causal", True)
    unsupported = sorted(name for name, given in kwargs.items() if name not in _NEUTRAL and given is not None)
    if not causal:
        unsupported.append("bidirectional attention")
    if unsupported:
        raise DocumentAttentionUnsupported(f"{type(module).__name__} passes {', '.join(unsupported)}")
    batch, _heads, length, _dim = query.shape
    if query.shape[2] != key.shape[2] or int(cu_seq_lens_q[-1]) != batch * length:
        raise DocumentAttentionUnsupported("cached keys or documents that do not cover the batch")
    parts = []
    for row, first, last in document_spans(cu_seq_lens_q.tolist(), length):
        piece = [t[row:row + 1, :, first:last] for t in (query, key, value)]
        size = last - first
        mask = None
        if sliding_window is not None and size > sliding_window:
            steps = torch.arange(size, device=query.device)
            offset = steps[:, None] - steps[None, :]
            mask = (offset >= 0) & (offset < sliding_window)
        parts.append(F.scaled_dot_product_attention(*piece, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                                    scale=scaling, enable_gqa=True))
    # [1, H, B*T, D] in flattened order -> [B, T, H, D], the layout attention modules expect back
    output = torch.cat(parts, dim=2).reshape(query.shape[1], batch, length, query.shape[3])
    return output.permute(1, 2, 0, 3).contiguous(), None


AttentionInterface.register(DOCUMENT_SDPA, _document_sdpa)
AttentionMaskInterface.register(DOCUMENT_SDPA, sdpa_mask)   # for the plain SDPA path (generation)


def plain_attention(model: torch.nn.Module) -> str:
    """The exact default: SDPA, or eager attention for the models transformers runs no SDPA for (Gemma 2, whose
    soft-capped scores SDPA cannot compute)."""
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def check_documents_apart(model: torch.nn.Module) -> None:
    """Raises unless `model`, set to this implementation, gives a packed row of two documents exactly the logits
    each document gets alone: a model whose layers do not hand the document boundaries down to their attention,
    or whose attention does more than this implementation knows, must not train on it."""
    if plain_attention(model) != "sdpa":
        raise DocumentAttentionUnsupported(f"{type(model).__name__} has no SDPA attention in transformers")
    device = next(model.parameters()).device
    lengths = (5, 7)
    ids = (torch.arange(sum(lengths), device=device) * 7 + 3) % model.config.vocab_size
    segments = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=ids[None], position_ids=positions[None], use_cache=False,
                           **packed_arguments(segments[None])).logits[0]
            alone = torch.cat([model(input_ids=part[None], use_cache=False).logits[0]
                               for part in ids.split(list(lengths))])
    finally:
        model.train(training)
    if not torch.allclose(packed.float(), alone.float(), rtol=1e-4, atol=1e-4):
        raise DocumentAttentionUnsupported(f"{type(model).__name__} lets packed documents see each other under "
                                           f"{DOCUMENT_SDPA} (largest logit difference "
                                           f"{(packed.float() - alone.float()).abs().max():.3g})")
