"""The chunked output-layer loss equals the plain one: same loss, same gradients, in fp32 and bf16, with and
without tied embeddings; models that post-process their logits take the plain path."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ray_finetune.data.packing import IGNORE_INDEX
from ray_finetune.train import loss as loss_module
from ray_finetune.train.loss import linear_cross_entropy, split_head, token_loss
from ray_finetune.train.models import load_model
from ray_finetune.train.step import CausalLMLoss


def labels_for(ids: torch.Tensor, prompt: int) -> torch.Tensor:
    labels = torch.roll(ids, -1, dims=1)
    labels[:, :prompt] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("chunk_elements", [1 << 26, 1000], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_cross_entropy_matches_full_logits(chunk_elements, dtype, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_LOGIT_ELEMENTS", chunk_elements)   # 1000 // 300 = 3 tokens a chunk
    torch.manual_seed(0)
    hidden = torch.randn(2, 20, 16, dtype=dtype, requires_grad=True)
    weight = (torch.randn(300, 16) * 0.3).to(dtype).requires_grad_()
    labels = labels_for(torch.randint(0, 300, (2, 20)), prompt=7)

    fused = linear_cross_entropy(hidden, weight, labels)
    fused.loss_sum.backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    plain = token_loss(hidden @ weight.T, labels)
    plain.loss_sum.backward()

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert fused.target_tokens == plain.target_tokens == 2 * 12
    assert fused.correct_tokens == plain.correct_tokens
    assert float(fused.loss_sum.detach()) == pytest.approx(float(plain.loss_sum.detach()), rel=tolerance)
    for mine, reference in zip(fused_grads, (hidden.grad, weight.grad)):
        assert mine.dtype == reference.dtype
        assert torch.allclose(mine.float(), reference.float(), rtol=tolerance, atol=tolerance * 1e-2)


def test_no_targets_gives_zero_loss_with_gradients_for_every_parameter():
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    result = linear_cross_entropy(hidden, weight, torch.full((1, 5), IGNORE_INDEX))
    result.loss_sum.backward()
    assert result.target_tokens == 0 and float(result.loss_sum) == 0.0
    assert weight.grad is not None and hidden.grad is not None


def test_model_loss_and_gradients_equal_the_full_logits_path(tiny_model):
    model = load_model(tiny_model)
    assert split_head(model) is not None        # a Llama's logits are exactly lm_head(model(...))
    reference = copy.deepcopy(model)
    ids = torch.randint(3, model.config.vocab_size, (1, 40))
    labels = labels_for(ids, prompt=15)
    positions = torch.arange(40)[None]

    mine = CausalLMLoss(model)(input_ids=ids, position_ids=positions, labels=labels)
    mine[0].backward()
    logits = reference(input_ids=ids, position_ids=positions, use_cache=False).logits
    theirs = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE_INDEX,
                             reduction="sum")
    theirs.backward()

    assert float(mine[0]) == pytest.approx(float(theirs), rel=1e-5)
    assert mine[1] == 24
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_models_that_change_their_logits_take_the_plain_path(tiny_model):
    model = load_model(tiny_model)

    class SoftCapped(torch.nn.Module):   # e.g. Gemma 2's final logit soft-capping: logits != lm_head(hidden)
        def __init__(self, inner):
            super().__init__()
            self.inner, self.base_model_prefix = inner, "model"
            self.model = inner.model

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, **kwargs):
            output = self.inner(**kwargs)
            output.logits = torch.tanh(output.logits / 2.0) * 2.0
            return output

    capped = SoftCapped(model)
    assert split_head(capped) is None
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    labels = labels_for(ids, prompt=4)
    loss_sum, targets, _ = CausalLMLoss(capped)(input_ids=ids, position_ids=torch.arange(12)[None], labels=labels)
    logits = capped(input_ids=ids).logits
    expected = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="sum")
    assert float(loss_sum) == pytest.approx(float(expected), rel=1e-5) and targets == 7


def test_evaluation_computes_no_gradients():
    """Under no_grad the chunked loss multiplies once per chunk (the logits), not three times (+ both gradients)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    hidden = torch.randn(1, 10, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    labels = torch.randint(0, 30, (1, 10))
    with torch.no_grad(), CountMatmuls() as evaluating:
        evaluated = linear_cross_entropy(hidden, weight, labels)
    with CountMatmuls() as training:
        trained = linear_cross_entropy(hidden, weight, labels)
    assert evaluating.count == 1 and training.count == 3
    assert float(evaluated.loss_sum) == pytest.approx(float(trained.loss_sum))


def test_linear_cross_entropy_refuses_a_second_backward():
    """Its backward scales the gradients it computed in place, so a second one (retain_graph) would double them."""
    hidden = torch.randn(1, 6, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, labels_for(torch.randint(0, 50, (1, 6)), prompt=2)).loss_sum
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        loss.backward()
