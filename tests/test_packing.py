"""Packing keeps documents apart: best fit, labels that never cross a boundary, attention that never crosses one,
and the same loss packed as unpacked."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_finetune.data.formats import TokenizedExample
from ray_finetune.data.packing import IGNORE_INDEX, PackedRows, best_fit, pack_examples, pack_stream
from ray_finetune.train.attention import DOCUMENT_SDPA, DocumentAttentionUnsupported, check_documents_apart
from ray_finetune.train.models import load_model
from ray_finetune.train.plan import EMPTY_ROW
from ray_finetune.train.step import CausalLMLoss, forward_loss, make_batch


def examples(count: int, seed: int = 0, vocab: int = 300, max_length: int = 60) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(4, max_length)
        prompt = rng.randint(1, length - 2)
        out.append(TokenizedExample([rng.randrange(3, vocab) for _ in range(length)],
                                    [False] * prompt + [True] * (length - prompt)))
    return out


def test_best_fit_places_every_example_once_within_capacity():
    lengths = [random.Random(1).randint(1, 100) for _ in range(500)]
    bins = best_fit(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert sum(lengths) / (len(bins) * 128) > 0.95


def test_rows_restart_positions_and_labels_stop_at_document_ends():
    data = examples(40)
    rows, stats = pack_examples(data, 128, pad_id=0)
    assert stats.examples == 40 and stats.truncated_examples == 0
    assert stats.tokens == sum(len(e) for e in data)
    assert stats.target_tokens == sum(e.target_count for e in data)
    for r in range(len(rows)):
        segments = rows.segment_ids[r]
        for s in set(segments.tolist()) - {-1}:
            where = np.flatnonzero(segments == s)
            assert rows.position_ids[r, where].tolist() == list(range(len(where)))
            assert rows.labels[r, where[-1]] == IGNORE_INDEX  # the last token of a document predicts nothing
        assert (rows.labels[r, segments == -1] == IGNORE_INDEX).all()


def test_truncation_is_counted_and_examples_left_with_nothing_to_learn_are_dropped():
    long_target = TokenizedExample(list(range(3, 203)), [True] * 200)
    long_prompt = TokenizedExample(list(range(3, 203)), [False] * 150 + [True] * 50)
    rows, stats = pack_examples([long_target, long_prompt], 100, pad_id=0)
    assert stats.truncated_examples == 2 and stats.dropped_examples == 1 and len(rows) == 1


def test_continued_pretraining_stream_keeps_every_token():
    documents = [TokenizedExample(list(range(3, 3 + n)), [True] * n) for n in (70, 50, 90, 10)]
    rows, stats = pack_stream(documents, 64, pad_id=0)
    assert stats.tokens == 220 and len(rows) == 4
    assert rows.segment_ids[1].tolist()[:6] == [0] * 6 and rows.position_ids[1, 0] == 0


@pytest.mark.parametrize("last_row_tokens", [1, 2])
def test_continued_pretraining_leaves_out_a_last_row_with_nothing_to_learn(last_row_tokens):
    """A stream one token longer than its full rows would end in a row whose lone token predicts nothing; a step of
    that row alone would have no target tokens to take its loss over. Two tokens make one target: that row stays."""
    documents = [TokenizedExample(list(range(3, 3 + n)), [True] * n) for n in (40, 24 + last_row_tokens)]
    rows, stats = pack_stream(documents, 32, pad_id=0)
    assert len(rows) == stats.rows == (2 if last_row_tokens == 1 else 3)
    assert all(rows.target_tokens([row]) > 0 for row in range(len(rows)))
    assert stats.tokens == 64 + (last_row_tokens if last_row_tokens > 1 else 0)
    assert stats.target_tokens == rows.target_tokens(range(len(rows)))


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model).eval()


# How a packed row can run: the whole row with SDPA run per document (the CPU path), each document alone (the CPU
# fallback), or the whole row with the documents kept apart by their position ids under each attention
# implementation (FlexAttention has no CPU backward: forward only here).
LAYOUTS = [("packed", DOCUMENT_SDPA), ("per-document", "sdpa"), ("packed", "sdpa"), ("packed", "eager"),
           ("packed", "flex_attention")]


@pytest.fixture(scope="module")
def sliding_window_model(tmp_path_factory):
    """A tiny Gemma 3: most of its layers attend over a sliding window only (8 tokens here, shorter than most
    documents), so a packed row must keep both the documents and the windows apart."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              max_position_embeddings=256, layer_types=["sliding_attention"] * 3 + ["full_attention"])
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gemma3")
    Gemma3ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
@pytest.mark.parametrize("layout,attention", LAYOUTS, ids=[f"{a}-{b}" for a, b in LAYOUTS])
def test_packed_and_unpacked_loss_are_equal(request, architecture, layout, attention):
    folder = request.getfixturevalue("tiny_model" if architecture == "llama" else "sliding_window_model")
    model = load_model(folder, attention=attention).eval()
    per_document = layout == "per-document"
    data = examples(12, seed=3, vocab=300)
    rows, _ = pack_examples(data, 128, pad_id=0)
    with torch.no_grad():
        packed = sum(float(forward_loss(CausalLMLoss(model), make_batch(rows, np.array([r])), per_document=per_document).loss_sum)
                     for r in range(len(rows)))
        unpacked = 0.0
        for example in data:
            ids = torch.tensor([example.input_ids])
            logits = model(input_ids=ids).logits[0, :-1]
            targets = torch.tensor(example.input_ids[1:])
            keep = torch.tensor(example.target_mask[1:])
            unpacked += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
    assert packed == pytest.approx(unpacked, rel=1e-5)


def test_attention_never_crosses_documents(model):
    first, second = examples(2, seed=5)
    rows, _ = pack_examples([first, second], 128, pad_id=0)
    changed = TokenizedExample([(t + 7) % 290 + 3 for t in first.input_ids], first.target_mask)
    rows_changed, _ = pack_examples([changed, second], 128, pad_id=0)

    def logits(packed):
        batch = make_batch(packed, np.array([0]))
        with torch.no_grad():   # no attention mask and no cache: the restarting position ids keep documents apart
            return model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]

    # find the second document in both packings (best fit may order them either way)
    def span(packed, length):
        for s in (0, 1):
            where = np.flatnonzero(packed.segment_ids[0] == s)
            if len(where) == length and packed.input_ids[0, where].tolist() == second.input_ids:
                return where
        raise AssertionError("second document not found")

    before = logits(rows)[span(rows, len(second))]
    after = logits(rows_changed)[span(rows_changed, len(second))]
    assert torch.equal(before, after)


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_per_document_sdpa_trains_like_one_pass_per_document(request, architecture):
    """A micro-batch of several rows (one of them an epoch's empty filler row) in training mode: the whole rows
    with SDPA run per document give the loss and every gradient that one forward pass per document gives. Gemma 3's
    sliding-window layers (8 tokens here) see documents longer than their window."""
    folder = request.getfixturevalue("tiny_model" if architecture == "llama" else "sliding_window_model")
    rows, _ = pack_examples(examples(14, seed=4, vocab=300), 128, pad_id=0)
    batch = make_batch(rows, np.array([*range(len(rows)), EMPTY_ROW]))
    results = {}
    for attention in (DOCUMENT_SDPA, "sdpa"):
        torch.manual_seed(0)
        model = load_model(folder, attention=attention).train()
        sums = forward_loss(CausalLMLoss(model), batch, per_document=True)
        sums.loss_sum.backward()
        results[attention] = (sums, {name: p.grad for name, p in model.named_parameters()})
    (packed, packed_grads), (alone, alone_grads) = results[DOCUMENT_SDPA], results["sdpa"]
    assert packed.target_tokens == alone.target_tokens and packed.correct_tokens == alone.correct_tokens
    assert float(packed.loss_sum) == pytest.approx(float(alone.loss_sum), rel=1e-5)
    for name, grad in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_batches_drop_the_padding_that_ends_all_their_rows_and_train_the_same(tiny_model):
    """make_batch cuts the columns after every row's last document (there is nothing to compute there), keeps the
    width a multiple of what it is asked for, and whole rows only when asked (memory sizing). The loss and every
    gradient equal those of the whole rows, in every layout a trainer runs."""
    packs = [pack_examples(examples(count, seed=6 + count, vocab=300, max_length=20), 128, pad_id=0)[0]
             for count in (1, 3)]   # two rows whose documents end at different columns
    rows = PackedRows(**{name: np.concatenate([getattr(pack, name) for pack in packs]) for name in PackedRows.FIELDS})
    indices = np.array([*range(len(rows)), EMPTY_ROW])
    used = int(max(np.flatnonzero(rows.segment_ids[r] >= 0)[-1] for r in range(len(rows)))) + 1
    assert used < 64
    assert make_batch(rows, indices).input_ids.shape == (len(indices), used)
    assert make_batch(rows, indices, width_multiple=64).input_ids.shape[1] == -(-used // 64) * 64
    assert make_batch(rows, indices, width_multiple=None).input_ids.shape[1] == 128
    assert make_batch(rows, np.array([EMPTY_ROW, EMPTY_ROW])).input_ids.shape == (2, 1)
    for layout, attention in LAYOUTS:
        if attention == "flex_attention":
            continue   # no CPU backward
        results = []
        for width_multiple in (1, None):
            torch.manual_seed(0)
            model = load_model(tiny_model, attention=attention).train()
            sums = forward_loss(CausalLMLoss(model), make_batch(rows, indices, width_multiple),
                                per_document=layout == "per-document")
            sums.loss_sum.backward()
            results.append((sums, {name: p.grad for name, p in model.named_parameters()}))
        (cut, cut_grads), (whole, whole_grads) = results
        assert (cut.target_tokens, cut.correct_tokens) == (whole.target_tokens, whole.correct_tokens)
        assert float(cut.loss_sum) == pytest.approx(float(whole.loss_sum), rel=1e-5), attention
        for name, grad in whole_grads.items():
            torch.testing.assert_close(cut_grads[name], grad, rtol=1e-4, atol=1e-5, msg=f"{attention} {name}")


def test_per_document_sdpa_is_plain_sdpa_outside_training_and_is_not_saved(tiny_model, tmp_path):
    """Generation (evaluation's samples, a served model) runs the model without document boundaries: the same
    tokens as SDPA. A checkpoint's config names no attention implementation, so it loads anywhere."""
    from transformers import AutoModelForCausalLM

    prompt = torch.tensor([[5, 17, 33, 8, 91]])
    outputs = {}
    for attention in (DOCUMENT_SDPA, "sdpa"):
        model = load_model(tiny_model, attention=attention).eval()
        outputs[attention] = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(outputs[DOCUMENT_SDPA], outputs["sdpa"])
    model.set_attn_implementation(DOCUMENT_SDPA)
    model.save_pretrained(tmp_path)
    assert DOCUMENT_SDPA not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_models_whose_attention_it_cannot_run_fall_back_to_one_pass_per_document(tmp_path, monkeypatch):
    """Gemma 2 soft-caps its attention scores, which SDPA cannot (transformers runs it with eager attention only):
    the trainer's set-up refuses per-document SDPA for it, says why, and trains it one document at a time with
    eager attention -- still exactly. Were its SDPA support claimed, the soft-capping its layers pass down would
    still be refused."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from ray_finetune.train.loop import ready_attention

    config = Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                          max_position_embeddings=256)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    assert load_model(tmp_path).config._attn_implementation == "eager"   # "sdpa" asked: the exact default
    model = load_model(tmp_path, attention=DOCUMENT_SDPA)
    with monkeypatch.context() as patched:
        patched.setattr(Gemma2ForCausalLM, "_supports_sdpa", True)
        with pytest.raises(DocumentAttentionUnsupported, match="softcap"):
            check_documents_apart(model)
    rows, _ = pack_examples(examples(6, seed=2, vocab=300), 128, pad_id=0)
    notes = ready_attention(model, rows, torch.device("cpu"))
    assert model.config._attn_implementation == "eager"
    assert "Gemma2ForCausalLM has no SDPA attention" in notes["attention_fallback"]
    batch = make_batch(rows, np.arange(len(rows)))
    with torch.no_grad():
        per_document = forward_loss(CausalLMLoss(model), batch)      # a CPU batch, no document attention
        whole_rows = forward_loss(CausalLMLoss(model), batch, per_document=False)
    assert float(per_document.loss_sum) == pytest.approx(float(whole_rows.loss_sum), rel=1e-5)
