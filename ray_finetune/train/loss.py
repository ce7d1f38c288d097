"""The token loss: summed cross-entropy over target tokens, computed without ever holding a long row's logits.

A causal LM's last step turns hidden states [T, H] into logits [T, V]; at T = 8 x 2048 tokens and Llama-3's V = 128k
the fp32 logits alone are 8 GiB, and their softmax gradient as much again. `linear_cross_entropy` computes the
loss in chunks of target tokens and the gradients of the hidden states and of the output weight in the same pass,
so at most one chunk's logits exist at a time and nothing is recomputed. Positions without a target (prompts,
padding) never reach the output layer at all, which also saves its compute for them.

Only for models whose logits are exactly `lm_head(base_model(...))`; `split_head` checks that once per model by
comparing both on a short probe, and every other model takes the plain path (full logits).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ray_finetune.data.packing import IGNORE_INDEX

# Logits held at once: chunk tokens x vocabulary x 4 bytes stays near 1 GiB whatever the vocabulary (about 2,000
# tokens at Llama-3's 128k: matrix products large enough to run at full speed, few enough to add up cheaply).
CHUNK_LOGIT_ELEMENTS = 1 << 28


@dataclass
class LossSums:
    loss_sum: torch.Tensor       # differentiable sum of token losses
    target_tokens: int
    correct_tokens: int          # targets whose logit is the largest (a tie counts: no argmax pass for it)


@dataclass(frozen=True)
class SplitModel:
    base: torch.nn.Module        # input ids -> last hidden states
    head: torch.nn.Linear        # hidden states -> logits, no bias


_SPLITS: "weakref.WeakKeyDictionary[torch.nn.Module, SplitModel | None]" = weakref.WeakKeyDictionary()


def split_head(model: torch.nn.Module) -> SplitModel | None:
    """The model as base + output layer when its logits are exactly head(base(x)), else None (checked once)."""
    if model not in _SPLITS:
        _SPLITS[model] = _probe_split(model)
    return _SPLITS[model]


def _probe_split(model: torch.nn.Module) -> SplitModel | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or not isinstance(base, torch.nn.Module):
        return None
    device = head.weight.device
    probe = torch.arange(1, 9, device=device)[None] % head.out_features
    training = model.training
    model.eval()   # dropout would make the two forward passes differ for no reason of structure
    try:
        with torch.no_grad():
            whole = model(input_ids=probe, use_cache=False).logits
            split = head(base(input_ids=probe, use_cache=False).last_hidden_state)
    finally:
        model.train(training)
    # Same modules, same order: a model that post-processes logits (soft-capping, scaling) differs by far more.
    if whole.shape != split.shape or not torch.allclose(whole.float(), split.float(), rtol=1e-3, atol=1e-3):
        return None
    return SplitModel(base=base, head=head)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> LossSums:
    """The plain path: full logits [.., V] and labels aligned with them (already shifted)."""
    flat_logits, flat_labels = logits.float().view(-1, logits.shape[-1]), labels.reshape(-1)
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    targets = flat_labels != IGNORE_INDEX
    with torch.no_grad():
        scored = flat_logits[targets]
        correct = int((scored.gather(1, flat_labels[targets][:, None]).squeeze(1) >= scored.amax(-1)).sum())
    return LossSums(loss_sum=loss_sum, target_tokens=int(targets.sum()), correct_tokens=correct)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> LossSums:
    """Summed cross-entropy of logits = hidden @ weight.T against labels, chunked (see the module docstring)."""
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    targets = torch.nonzero(flat_labels != IGNORE_INDEX).flatten()
    if targets.numel() == 0:
        zero = (hidden.sum() + weight.sum()) * 0.0   # keeps both in the graph: every rank reduces every gradient
        return LossSums(loss_sum=zero, target_tokens=0, correct_tokens=0)
    chunk = max(1, CHUNK_LOGIT_ELEMENTS // weight.shape[0])
    # Under no_grad (evaluation) autograd still reports the inputs as needing gradients; say it explicitly.
    loss_sum, correct = _LinearCrossEntropy.apply(flat_hidden[targets], weight, flat_labels[targets], chunk,
                                                  torch.is_grad_enabled())
    return LossSums(loss_sum=loss_sum, target_tokens=int(targets.numel()), correct_tokens=int(correct))


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward only scales them."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        need_hidden, need_weight = training and ctx.needs_input_grad[0], training and ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None   # accumulated over chunks in fp32; cast to the weight's dtype once, in backward
        for start in range(0, hidden.shape[0], chunk):
            part, part_labels = hidden[start:start + chunk], labels[start:start + chunk]
            logits = (part @ weight.T).float()
            target_logits = logits.gather(1, part_labels[:, None]).squeeze(1)
            # The softmax in the logits' own memory (a chunk's logits are a gigabyte: no second copy of them)
            largest = logits.amax(dim=-1, keepdim=True)
            correct += (target_logits >= largest.squeeze(1)).sum()   # the maximum the softmax needs anyway
            exponentials = logits.sub_(largest).exp_()
            normalizer = exponentials.sum(dim=-1)
            loss += (normalizer.log() + largest.squeeze(1) - target_logits).sum()
            if need_hidden or need_weight:
                # d loss / d logits = softmax - one_hot
                gradient = exponentials.div_(normalizer[:, None])
                gradient[torch.arange(part.shape[0], device=part.device), part_labels] -= 1.0
                gradient = gradient.to(part.dtype)
                if need_hidden:
                    grad_hidden[start:start + chunk] = gradient @ weight
                if need_weight:
                    contribution = gradient.T @ part
                    # The first chunk's product is the buffer (no zero-filled [V, H] first; a copy only in bf16);
                    # later ones are promoted to fp32 as they are added in place.
                    grad_weight = contribution.float() if grad_weight is None else grad_weight.add_(contribution)
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight) if t is not None))
        ctx.computed = (need_hidden, need_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_correct: Any) -> tuple[Any, ...]:
        # Scaled in place: they are this pass's own buffers, and a [vocabulary x hidden] copy per step is not free.
        # Hence once only (a training step never runs a backward twice).
        if getattr(ctx, "scaled", False):
            raise RuntimeError("linear_cross_entropy's backward cannot run twice (retain_graph)")
        ctx.scaled = True
        saved = list(ctx.saved_tensors)
        need_hidden, need_weight = ctx.computed
        grad_hidden = saved.pop(0).mul_(grad_loss.to(saved[0].dtype)) if need_hidden else None
        grad_weight = saved.pop(0).mul_(grad_loss).to(ctx.weight_dtype) if need_weight else None
        return grad_hidden, grad_weight, None, None, None
