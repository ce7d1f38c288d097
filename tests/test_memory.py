"""Micro-batch fitting: sizes grow while they fit and pay, out-of-memory stops the growth, the step stays the same."""
from __future__ import annotations

import pytest
import torch

from ray_finetune.spec import Duration
from ray_finetune.train.memory import (WORTH_DOUBLING, checkpoint_activations, fastest_fitting, fit_micro_batch,
                                       growing_sizes, micro_batch_candidates, timed_trial, with_micro_batch)
from ray_finetune.train.plan import make_plan


def test_candidates_divide_the_rows_of_a_rank_largest_first():
    assert micro_batch_candidates(12) == [12, 6, 4, 3, 2, 1]
    assert micro_batch_candidates(1) == [1]


def test_sizes_tried_about_double_from_one_row_up_to_all_of_a_ranks_rows():
    assert growing_sizes(micro_batch_candidates(64)) == [1, 2, 4, 8, 16, 32, 64]
    assert growing_sizes(micro_batch_candidates(12)) == [1, 2, 4, 12]
    assert growing_sizes(micro_batch_candidates(6)) == [1, 2, 6]
    assert growing_sizes([1]) == [1]


def test_grows_until_a_size_runs_out_of_memory():
    tried = []

    def seconds_for(size: int) -> float:   # the GPU never busy: twice the rows, twice the rows per second
        tried.append(size)
        if size > 4:
            raise torch.OutOfMemoryError(f"{size} rows do not fit")
        return 1.0

    found = fastest_fitting(micro_batch_candidates(16), seconds_for)
    assert (found.size, found.out_of_memory_at, found.rows_per_second) == (4, [8], {1: 1.0, 2: 2.0, 4: 4.0})
    assert tried == [1, 2, 4, 8]   # one trial ran out of memory, none after it


def test_stops_growing_where_the_gpu_is_busy_unless_a_group_reduces_after_every_micro_batch():
    """A pass takes at least 0.1 s (the GPU idle below 10 rows), then 0.01 s a row: 16 rows are 25% faster per row
    than 8, 32 no faster than 16, so 16 is kept on one GPU; a group keeps growing while it fits."""
    tried = []

    def seconds_for(size: int) -> float:
        tried.append(size)
        return max(0.1, 0.01 * size)

    found = fastest_fitting(micro_batch_candidates(256), seconds_for)
    rates = found.rows_per_second
    assert found.size == 16 and found.out_of_memory_at == [] and tried == [1, 2, 4, 8, 16, 32]
    assert rates[32] < (1 + WORTH_DOUBLING) * rates[16] and rates[16] > (1 + WORTH_DOUBLING) * rates[8]
    assert fastest_fitting(micro_batch_candidates(256), seconds_for, worth_doubling=-1.0).size == 256


def test_a_size_predicted_not_to_pay_is_never_tried_so_its_memory_is_never_taken():
    """Once a pass's time grows in step with its rows, twice the rows cannot be worth it: 1 ms fixed, 10 ms a row.
    2 rows are 4.8% faster per row than 1; 4 would be 2.5% faster than 2 (the line through 1 and 2 says so)."""
    tried = []

    def seconds_for(size: int) -> float:
        tried.append(size)
        return 0.001 + 0.01 * size

    found = fastest_fitting(micro_batch_candidates(64), seconds_for)
    assert found.size == 2 and tried == [1, 2] and list(found.predicted_rows_per_second) == [4]
    assert found.predicted_rows_per_second[4] == pytest.approx(4 / 0.041)   # exact for a line
    assert fastest_fitting(micro_batch_candidates(64), seconds_for, worth_doubling=-1.0).size == 64


def test_says_what_to_do_when_nothing_fits():
    def never(size: int) -> float:
        raise torch.OutOfMemoryError("no")

    with pytest.raises(torch.OutOfMemoryError, match="context_length"):
        fastest_fitting([2, 1], never)


def test_other_errors_are_not_taken_for_out_of_memory():
    def broken(size: int) -> float:
        raise RuntimeError("a bug, not a size problem")

    with pytest.raises(RuntimeError, match="a bug"):
        fastest_fitting([2, 1], broken)


def test_a_size_is_timed_once_warm():
    """The first pass of a size picks (and compiles) its kernels and grows the allocator: timed is the second."""
    calls = []
    seconds = timed_trial(calls.append, torch.device("cpu"))(3)
    assert calls == [3, 3] and seconds >= 0


def test_activations_are_recomputed_only_when_not_even_one_row_fits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 20, 16 << 20))
    plan = make_plan(rows=512, tokens=51_200, duration=Duration(value=1, unit="ep"), world_size=1, seed=0)
    assert 2 in micro_batch_candidates(plan.global_batch_rows) and plan.global_batch_rows > 2
    recomputing = []

    def try_rows(size: int) -> float:   # without recomputation nothing fits; with it, up to 2 rows
        if not recomputing or size > 2:
            raise torch.OutOfMemoryError(f"{size} rows")
        return 1.0

    def recompute() -> bool:
        recomputing.append(True)
        return True

    fitted, notes = fit_micro_batch(plan, 1000, torch.device("cpu"), try_rows, recompute)
    assert recomputing == [True] and notes["activation_checkpointing"] is True
    assert fitted.micro_batch_rows == 2
    assert notes["out_of_memory_at"] == [4] and notes["rows_per_second"] == {"1": 1.0, "2": 2.0}

    recomputing.append(True)     # already recomputing: a size that fits needs no more
    fitted, notes = fit_micro_batch(plan, 1000, torch.device("cpu"), try_rows, recompute)
    assert notes["activation_checkpointing"] is False and fitted.micro_batch_rows == 2

    recomputing.clear()          # off ("RAY_FINETUNE_ACTIVATION_CHECKPOINTING=off"): nothing fits, say so
    with pytest.raises(torch.OutOfMemoryError, match="context_length"):
        fit_micro_batch(plan, 1000, torch.device("cpu"), try_rows, None)


def test_checkpointed_activations_give_the_same_gradients(tiny_model):
    from ray_finetune.train.models import load_model

    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 24))
    gradients = []
    for recompute in (False, True):
        model = load_model(tiny_model)
        model.train()
        if recompute:
            assert checkpoint_activations(model) and model.is_gradient_checkpointing
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        gradients.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*gradients):
        torch.testing.assert_close(recomputed, plain)


def test_trials_run_as_training_will(tiny_model, tmp_path):
    """A loaded model is in evaluation mode, where checkpointing does not engage: a trial there would size the
    micro-batch for memory training does not get. With checkpointing on, each layer's parts run again in the
    backward pass (counted by wrapping a part's forward: module hooks do not fire in the recomputation)."""
    from ray_finetune.data.packing import PackedRows
    from ray_finetune.train import loop
    from ray_finetune.train.models import load_model
    from trainer_helpers import packed_chat_run

    rows = PackedRows.load(packed_chat_run(tiny_model, tmp_path)[0])
    runs = {}
    for recompute in (False, True):
        model = load_model(tiny_model)
        assert not model.training
        if recompute:
            checkpoint_activations(model)
        try_rows = loop.trial_step(model, rows, torch.device("cpu"))
        calls, mlp = [], model.model.layers[0].mlp
        mlp.forward = lambda *args, _forward=mlp.forward, **kwargs: calls.append(1) or _forward(*args, **kwargs)
        try_rows(2)
        runs[recompute] = len(calls)
        assert not model.training                     # left as it was
    assert runs[True] == 2 * runs[False] > 0


def test_a_new_micro_batch_keeps_every_step_the_same():
    plan = make_plan(rows=800, tokens=80_000, duration=Duration(value=2, unit="ep"), world_size=2, seed=3)
    fitted = with_micro_batch(plan, 4)
    assert fitted.micro_batch_rows * fitted.gradient_accumulation_steps == plan.global_batch_rows // 2
    for step in range(plan.total_steps):
        for rank in range(2):
            before = [list(m) for m in plan.rank_micro_batches(step, rank)]
            after = [list(m) for m in fitted.rank_micro_batches(step, rank)]
            assert sum(before, []) == sum(after, [])       # the same rows, in the same order
            assert all(len(m) == 4 for m in after)


def test_set_up_falls_back_to_sdpa_and_fits_a_micro_batch(tiny_model, tmp_path, monkeypatch):
    """The trainer's set-up, run on CPU before any GPU session: FlexAttention cannot run a backward pass here (a
    real failure of the faster kernel), so the model falls back to SDPA and says why; then a micro-batch is fitted
    with the optimizer's memory held (the device's memory is what mem_get_info reports, stubbed)."""
    from ray_finetune.train import loop
    from ray_finetune.train.hardware import FP32
    from ray_finetune.train.models import load_model
    from trainer_helpers import packed_chat_run

    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    from ray_finetune.data.packing import PackedRows

    rows = PackedRows.load(rows_path)
    plan = make_plan(rows=stats.rows, tokens=stats.tokens, duration=Duration(value=1, unit="ep"), world_size=1,
                     seed=0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))
    model = load_model(tiny_model, attention="flex_attention")
    notes = loop._ready_model(model, rows, torch.device("cpu"), FP32, stage=2, compile_layers=False)
    assert model.config._attn_implementation == "sdpa" and "flex_attention failed" in notes["attention_fallback"]
    try_rows = loop.trial_step(model, rows, torch.device("cpu"))
    fitted, notes = fit_micro_batch(plan, sum(p.numel() for p in model.parameters()), torch.device("cpu"),
                                    lambda count: try_rows(count) or 1.0)   # a GPU never busy: grows while it fits
    assert model.config._attn_implementation == "sdpa"
    per_rank = plan.global_batch_rows
    assert fitted.micro_batch_rows == per_rank == notes["micro_batch_rows"]      # plenty of room: all rows at once
    assert fitted.gradient_accumulation_steps == 1 and notes["out_of_memory_at"] == []
    assert all(p.grad is None for p in model.parameters())                        # trials leave no gradients


def _probe_rows(model, lengths: list[int]):
    """What autograd keeps for a row of documents of these lengths, every token a target."""
    from ray_finetune.train.memory import saved_for_backward
    from ray_finetune.train.step import Batch, CausalLMLoss, forward_loss

    ids = torch.randint(3, model.config.vocab_size, (1, sum(lengths)))
    batch = Batch(input_ids=ids, labels=ids.clone(), position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                  segment_ids=torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None])
    probe = CausalLMLoss(model)
    return saved_for_backward(lambda: forward_loss(probe, batch), model.parameters())


def test_what_a_cpu_step_keeps_for_its_backward_pass_follows_from_two_short_probes(tiny_model):
    """A CPU trainer works out its memory before it trains (the kernel would kill it, not raise): from two short
    probe rows it predicts exactly what a long row of several documents keeps, with or without the chunked loss."""
    from ray_finetune.train.attention import DOCUMENT_SDPA
    from ray_finetune.train.memory import activation_bytes
    from ray_finetune.train.models import load_model

    for attention in (DOCUMENT_SDPA, "sdpa"):     # whole rows with SDPA per document; one pass per document
        model = load_model(tiny_model, attention=attention).train()
        predicted = activation_bytes(lambda tokens: _probe_rows(model, [tokens]))
        assert predicted.per_token > 0 and predicted.fixed > 0   # the output layer's gradient, whatever the length
        for lengths in ([300], [100, 150, 50], [480]):
            assert _probe_rows(model, lengths) == pytest.approx(predicted.of(sum(lengths)), rel=0.02)


def test_a_cpu_trainer_recomputes_activations_only_when_they_would_not_fit_and_else_says_what_it_needs():
    from ray_finetune.train.memory import ActivationBytes, fit_cpu_memory

    activations = ActivationBytes(fixed=100 << 20, per_token=1 << 20)     # 1 MiB a token, 100 MiB whatever
    common = dict(parameters=100_000_000, precision="fp32", activations=activations, tokens=4096, layers=32,
                  hidden_bytes=4096, transient=256 << 20, budget_source="the test's budget",
                  context_length=4096)
    state = 100_000_000 * 16
    roomy = fit_cpu_memory(budget=64 << 30, checkpointing="auto", **common)
    assert not roomy.recomputing and roomy.state == state and roomy.total > state + (4 << 30)
    tight = fit_cpu_memory(budget=5 << 30, checkpointing="auto", **common)
    assert tight.recomputing and state < tight.total <= 5 << 30
    assert fit_cpu_memory(budget=64 << 30, checkpointing="on", **common).recomputing      # asked for: always
    with pytest.raises(MemoryError, match="RAY_FINETUNE_ACTIVATION_CHECKPOINTING=auto would recompute"):
        fit_cpu_memory(budget=5 << 30, checkpointing="off", **common)
    with pytest.raises(MemoryError) as refused:
        fit_cpu_memory(budget=1 << 30, checkpointing="auto", **common)
    message = str(refused.value)
    assert "context_length=4096" in message and "1.5 GiB of model state" in message and "recomputed" in message
    assert "100 M parameters in fp32" in message
    assert "more than the 1.0 GiB it has (the test's budget)" in message
    assert "shorter context_length" in message


def test_a_cpu_run_that_would_not_fit_recomputes_activations_or_fails_before_training(tmp_path):
    """The trainer's set-up with a memory budget: plenty, it keeps activations; between what recomputation needs
    and what keeping them needs, it recomputes them (and says so); below that it refuses, naming the figures.
    Sixteen layers: recomputing the activations of a model of few saves nothing (memory.RECOMPUTE_WORKSPACE_LAYERS)."""
    from ray_finetune.data.packing import PackedRows
    from ray_finetune.train import loop
    from ray_finetune.train.hardware import FP32
    from ray_finetune.train.models import load_model
    from tiny_model import build_tiny_model
    from trainer_helpers import packed_chat_run

    tiny_model = build_tiny_model(tmp_path / "deeper", layers=16)
    rows_path, stats, _ = packed_chat_run(tiny_model, tmp_path)
    rows = PackedRows.load(rows_path)
    plan = make_plan(rows=stats.rows, tokens=stats.tokens, duration=Duration(value=1, unit="ep"), world_size=1,
                     seed=0)

    def set_up(budget_gb: float):
        model = load_model(tiny_model)
        parameters = sum(p.numel() for p in model.parameters())
        _, notes = loop.fit_memory(model, parameters, plan, rows, torch.device("cpu"), FP32, 0, "auto",
                                    (budget_gb * 2**30, "test budget"))
        assert model.is_gradient_checkpointing == notes["activation_checkpointing"]
        return notes

    roomy = set_up(64)
    assert roomy["activation_checkpointing"] is False and 0 < roomy["memory"]["needed_gb"] < 64
    kept, state = roomy["memory"]["activations_gb"], roomy["memory"]["model_state_gb"]
    tight = set_up(roomy["memory"]["needed_gb"] - kept / 100)
    assert tight["activation_checkpointing"] is True
    assert tight["memory"]["activations_gb"] < kept and tight["memory"]["model_state_gb"] == state
    with pytest.raises(MemoryError, match="context_length=64.*more than the [0-9.]+ MiB it has \\(test budget\\)"):
        set_up(state / 2)


def test_a_micro_batch_token_limit_caps_the_search_but_never_below_one_row(monkeypatch):
    """RAY_FINETUNE_MICRO_BATCH_TOKENS: GPU memory left to others; the search starts at the limit, not above it."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 20, 16 << 20))
    plan = make_plan(rows=4096, tokens=409_600, duration=Duration(value=1, unit="ep"), world_size=1, seed=0)
    assert plan.global_batch_rows == 64
    assert micro_batch_candidates(12, most_rows=5) == [4, 3, 2, 1]
    assert micro_batch_candidates(12, most_rows=0) == micro_batch_candidates(12)
    tried = []
    fitted, notes = fit_micro_batch(plan, 1000, torch.device("cpu"), lambda count: tried.append(count) or 1.0,
                                    most_rows=16)
    assert tried == [1, 2, 4, 8, 16] and fitted.micro_batch_rows == 16 and fitted.gradient_accumulation_steps == 4
    assert notes["micro_batch_rows_limit"] == 16 and notes["out_of_memory_at"] == []
    assert micro_batch_candidates(64, most_rows=1) == [1]


def test_the_micro_batch_token_limit_is_a_setting_the_trainers_read(monkeypatch):
    from ray_finetune import settings
    from ray_finetune.errors import ConfigError

    monkeypatch.setenv("RAY_FINETUNE_MICRO_BATCH_TOKENS", "32768")
    chosen = settings.load()
    assert chosen.micro_batch_tokens == 32768
    assert chosen.as_env()["RAY_FINETUNE_MICRO_BATCH_TOKENS"] == "32768"
    monkeypatch.setenv("RAY_FINETUNE_MICRO_BATCH_TOKENS", "32k")
    with pytest.raises(ConfigError, match="RAY_FINETUNE_MICRO_BATCH_TOKENS"):
        settings.load()


def test_a_gpu_trainer_turns_the_token_limit_into_whole_rows(monkeypatch, tiny_model, tmp_path):
    from ray_finetune.data.packing import PackedRows
    from ray_finetune.train import loop
    from ray_finetune.train.models import load_model
    from trainer_helpers import packed_chat_run

    rows = PackedRows.load(packed_chat_run(tiny_model, tmp_path)[0])
    context = rows.input_ids.shape[1]
    plan = make_plan(rows=len(rows), tokens=100, duration=Duration(value=1, unit="ep"), world_size=1, seed=0)
    limits = []

    def fit(plan, parameters, device, try_rows, fallback, precision, most_rows):   # the search itself: above
        limits.append(most_rows)
        return plan, {"activation_checkpointing": False}

    monkeypatch.setattr(loop, "fit_micro_batch", fit)
    model = load_model(tiny_model)
    for tokens in (0, 3 * context + 5, context // 2):
        loop.fit_memory(model, 1000, plan, rows, torch.device("cuda"), "bf16", 2, "off", None, tokens)
    assert limits == [0, 3, 1]   # no limit; whole rows under it; never less than one row


def test_a_run_says_how_many_rows_a_worker_runs_at_once_and_why_not_more():
    """TRAIN_STARTED's message, for the operator wondering why a GPU runs smaller micro-batches than the step."""
    from actors.trainer_group import micro_batch_note

    assert micro_batch_note(1, {}) == "1 at a time per worker"   # a CPU trainer: the plan's micro-batch
    assert micro_batch_note(16, {"micro_batch_rows_limit": None, "out_of_memory_at": [64, 32]}) == (
        "16 at a time per worker; 64, 32 did not fit in GPU memory")
    assert micro_batch_note(8, {"micro_batch_rows_limit": 8, "out_of_memory_at": []}) == (
        "8 at a time per worker; at most 8 by RAY_FINETUNE_MICRO_BATCH_TOKENS")
    assert micro_batch_note(16, {"out_of_memory_at": [], "rows_per_second": {"8": 20.0, "16": 30.0, "32": 30.3}}) == (
        "16 at a time per worker; 32 trained +1% rows/s, not worth the activation memory")
    assert micro_batch_note(2, {"out_of_memory_at": [], "rows_per_second": {"1": 90.9, "2": 95.2},
                                "predicted_rows_per_second": {"4": 97.6}}) == (
        "2 at a time per worker; 4 would train +3% rows/s, not worth the activation memory")
