"""GPU training throughput: ray_finetune's training loop (the code each DeepSpeed trainer worker runs, called
directly, without Ray) against the Hugging Face Trainer with a padding collator, in one invocation, on the same
Llama-3.2-1B-shaped model (random init), the same SFT-like examples (lognormal lengths around 330 tokens, 40% of
each a masked prompt), learning rate and optimizer (AdamW, bf16 with fp32 master weights). Prints useful
(non-padding) tokens/s, MFU (6 N tokens/s over 989 TFLOP/s dense bf16), peak memory (GPU: allocated; CPU: the
process's resident), and the ratios.

    python bench/gpu_bench.py              # ours vs the HF Trainer, context 2048 (about 4 minutes on an H200)
    python bench/gpu_bench.py --variants sdpa,compiled   # also ours with SDPA attention / compiled decoder layers
                                    # (and: checkpointed = activations recomputed, zero3 = ZeRO-3 on one GPU,
                                    # micro16k = micro-batches of at most 16k tokens)
    python bench/gpu_bench.py --scaling    # ours: step time and memory by context length 512..8192, two model sizes
                                           # (without a GPU: on CPU, the tiny and SmolLM2-135M shapes, one row a step)
    python bench/gpu_bench.py --tiny       # a small config, CPU is fine: checks that the script runs (a minute)
    python bench/gpu_bench.py --trl        # also TRL's SFTTrainer with packing (needs trl, datasets)
    python bench/gpu_bench.py --session --deadline 540   # what one GPU lease runs: the comparison, then scaling
                        # rows and variants by priority until the deadline (seconds), saving after each contender

Each contender runs in its own process (its own peak memory, a clean GPU). With OUT=<folder> the results are also
written to <folder>/gpu_bench.json (gpu_bench_scaling.json with --scaling). Needs torch, transformers, deepspeed, pydantic, numpy; not Ray.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")   # DeepSpeed 0.19.8 cannot parse torch's "9.0a"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PEAK_FLOPS = 989e12          # H100/H200 SXM, dense bf16
LEARNING_RATE = 1e-5
MODELS = {
    # Llama-3.2-1B's shape (tied embeddings, as the peers' baseline)
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    # SmolLM2-135M's shape
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


LENGTH_SIGMA = 0.8


def examples_for(vocab: int, count: int, context: int, mean_fraction: float = 0.12, seed: int = 0) -> list[dict]:
    """Lengths lognormal around mean_fraction x context (331 tokens mean at 2048, as the peers' baseline), 40% of
    each a prompt without loss."""
    import numpy as np

    rng, tokens = random.Random(seed), np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = max(16, min(context, int(rng.lognormvariate(math.log(context * mean_fraction), LENGTH_SIGMA))))
        prompt = max(1, int(length * 0.4))
        out.append({"input_ids": tokens.integers(10, vocab, length).tolist(), "prompt": prompt})
    return out


def examples_for_batch(rows_a_step: int, context: int, mean_fraction: float = 0.12) -> int:
    """How many examples make the plan take `rows_a_step` rows a step (a power of two, at most its cap): the plan
    chooses the largest batch that leaves TARGET_STEPS_PER_EPOCH steps an epoch (train/plan.py), so that many
    steps' worth of rows, and 5% more for the rows' unfilled ends."""
    from ray_finetune.train.plan import TARGET_STEPS_PER_EPOCH

    return math.ceil(rows_a_step * TARGET_STEPS_PER_EPOCH * context * 1.05 / mean_length(context, mean_fraction))


def mean_length(context: int, mean_fraction: float) -> float:
    """The mean of examples_for's lengths (a lognormal's mean; its clipping moves it by well under 1%)."""
    return context * mean_fraction * math.exp(LENGTH_SIGMA ** 2 / 2)


def build_model(name: str, folder: Path, context: int) -> Path:
    """A random-init model of the given shape saved as an HF folder (bf16), with a small tokenizer for its pad id."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_model import build_tiny_model

    if (folder / "config.json").exists():
        return folder
    build_tiny_model(folder)   # writes a tokenizer (and a tiny model, replaced below)
    # Built once per shape and reused for every context of a scaling table: long enough for its longest (8192).
    config = LlamaConfig(**MODELS[name], max_position_embeddings=max(context, 8192), tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def peak_memory_gb() -> float:
    """On a GPU the most its allocator held; on CPU the process's peak resident memory (each contender runs in its
    own process, so this is the model, its training state and the step's activations, plus the interpreter)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def reset_peak_memory() -> None:
    """From here on peak_memory_gb counts anew (on a GPU; a process's peak resident memory cannot be reset)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def matmul_parameters(model_name: str) -> int:
    shape = MODELS[model_name]
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = hidden * hidden * 2 + hidden * kv * 2 + hidden * inter * 3
    return layers * per_layer + shape["vocab_size"] * hidden    # the output layer (tied with the embedding)


def run_ours(model_path: Path, model_name: str, context: int, examples: list[dict], steps: int, warmup: int,
             work: Path) -> dict:
    from ray_finetune.data.formats import TokenizedExample
    from ray_finetune.data.packing import pack_examples
    from ray_finetune.spec import Duration
    from ray_finetune.train import loop
    from ray_finetune.train.distributed import join_process_group
    from ray_finetune.train.plan import make_plan

    join_process_group(0, 1)
    documents = [TokenizedExample(e["input_ids"], [False] * e["prompt"] + [True] * (len(e["input_ids"]) - e["prompt"]))
                 for e in examples]
    rows, stats = pack_examples(documents, context, pad_id=2)
    rows.save(work / "rows")
    # One step more than measured: the stop comes first, so no final checkpoint is written (nor any other).
    plan = make_plan(rows=len(rows), tokens=stats.tokens, duration=Duration(value=steps + 1, unit="ba"),
                     world_size=1, seed=0)
    reports, initialized = [], {}
    profiler = Profile(warmup) if os.environ.get("GPU_BENCH_PROFILE") == "1" else None
    if os.environ.get("GPU_BENCH_LARGEST_MICRO_BATCH") == "1":
        from ray_finetune.train import memory

        memory.WORTH_DOUBLING = -1.0   # grow while it fits, as a group of GPUs does

    class Collect(loop.SilentReporter):   # stops after `steps` steps (a plain stop writes no checkpoint)
        def model_initialized(self, info):
            initialized.update(info)
            # The set-up's own peak (the micro-batch search tries a size larger than the one it keeps) apart from
            # training's: from here on the GPU holds what the steps need.
            initialized["setup_peak_memory_gb"] = peak_memory_gb()
            reset_peak_memory()

        def step_finished(self, report):
            reports.append(report)
            if profiler:
                profiler.step_finished(len(reports), report.step_seconds)
        def stop_requested(self): return loop.STOP if len(reports) >= steps else loop.STOP_NONE

    config = loop.TrainConfig(run_name="bench", model_path=str(model_path), init_weights_path=None,
                              train_rows_path=str(work / "rows"), plan=plan, learning_rate=LEARNING_RATE,
                              save_folder=str(work / "ours"), rank=0, world_size=1, seed=0,
                              checkpoint_every=Duration(value=10**6, unit="ba"))
    started = time.perf_counter()
    loop.train(config, Collect())
    timed = reports[warmup:]
    if not timed:
        raise SystemExit(f"only {len(reports)} steps ran; need more than {warmup} (more examples)")
    seconds = sum(r.step_seconds for r in timed)
    tokens = sum(r.tokens for r in timed)
    rate = tokens / seconds
    return {"useful_tokens_per_s": rate, "mfu": 6 * matmul_parameters(model_name) * rate / PEAK_FLOPS,
            "step_seconds": seconds / len(timed), "tokens_per_step": tokens / len(timed),
            "mean_loss": sum(r.loss for r in timed) / len(timed), "steps_timed": len(timed),
            "peak_memory_gb": max(peak_memory_gb(), initialized.get("setup_peak_memory_gb", 0.0)),
            "training_peak_memory_gb": peak_memory_gb() if gpu_present() else None,
            "setup_peak_memory_gb": initialized.get("setup_peak_memory_gb"),
            "packing_efficiency": round(stats.packing_efficiency, 4),
            "precision": initialized.get("precision"), "attention": initialized.get("attention"),
            "micro_batch_rows": initialized.get("plan", {}).get("micro_batch_rows"),
            "out_of_memory_at": initialized.get("out_of_memory_at"),
            "micro_batch_rows_per_second": initialized.get("rows_per_second"),   # the search's timed sizes
            "micro_batch_predicted_rows_per_second": initialized.get("predicted_rows_per_second"),   # not tried
            "attention_fallback": initialized.get("attention_fallback"),
            "zero_stage": initialized.get("zero_stage"),
            "activation_checkpointing": initialized.get("activation_checkpointing"),
            "memory_estimate": initialized.get("memory"),   # a CPU trainer's (loop.fit_cpu)
            # what the trainer process set (distributed.prefer_expandable_gpu_memory) or found set
            "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"),
            "wall_seconds": time.perf_counter() - started, **(profiler.summary() if profiler else {})}


class Profile:
    """torch.profiler over the PROFILED_STEPS steps after the warm-up: where a step's time goes on the device, and
    how much of the step the device was busy at all (the rest: the host launching kernels or waiting on syncs).
    Its steps run slower than unprofiled ones; the variant is for the breakdown, not the rate."""
    PROFILED_STEPS = 2

    def __init__(self, warmup: int) -> None:
        import torch

        self.on_gpu = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                               if self.on_gpu else [])
        self.profiler = torch.profiler.profile(activities=activities)
        self.warmup, self.seconds, self.done = warmup, 0.0, False

    def step_finished(self, steps_done: int, step_seconds: float) -> None:
        if steps_done == self.warmup:
            self.profiler.start()
        elif self.warmup < steps_done <= self.warmup + self.PROFILED_STEPS:
            self.seconds += step_seconds
            if steps_done == self.warmup + self.PROFILED_STEPS:
                self.profiler.stop()
                self.done = True

    def summary(self) -> dict:
        if not self.done:
            return {"profile": "too few steps to profile"}
        own_time = "self_device_time_total" if self.on_gpu else "self_cpu_time_total"

        def own(event) -> float:   # microseconds of the op's own (children excluded) on the device, else the host
            return getattr(event, own_time)

        averages = self.profiler.key_averages()   # aggregated once: it walks every recorded event
        events = sorted(averages, key=own, reverse=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "profile.txt").write_text(averages.table(sort_by=own_time, row_limit=40))
        busy = sum(own(event) for event in events) / 1e6
        return {"profiled_seconds": round(self.seconds, 3),
                "device_busy_share": round(busy / self.seconds, 3) if self.on_gpu and self.seconds else None,
                "profile_top": [[event.key[:80], round(own(event) / 1e3, 1), event.count] for event in events[:25]]}


def step_timer(warmup: int, steps: int):
    """A Trainer callback timing steps warmup+1..steps (the device synchronized at both marks)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = {}

        def _mark(self, name: str) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks[name] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self._mark("start")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == steps:
                self._mark("end")

    return StepTimer()


def peer_arguments(cls, work: Path, steps: int, batch: int, **extra):
    """The peers' TrainingArguments (or TRL's SFTConfig): our hyperparameters, bf16 autocast and fused AdamW on a
    GPU, no checkpoints, no logging beyond the loss."""
    import torch

    on_gpu = torch.cuda.is_available()
    return cls(output_dir=str(work), per_device_train_batch_size=batch, max_steps=steps, learning_rate=LEARNING_RATE,
               adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, bf16=on_gpu, logging_steps=1,
               save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
               optim="adamw_torch_fused" if on_gpu else "adamw_torch", use_cpu=not on_gpu, disable_tqdm=True,
               **extra)


def peer_result(model_name: str, result, timer, counted: list[int], steps: int, warmup: int, **extra) -> dict:
    seconds = timer.marks["end"] - timer.marks["start"]
    tokens = sum(counted[warmup:steps])
    rate = tokens / seconds
    return {"useful_tokens_per_s": rate, "mfu": 6 * matmul_parameters(model_name) * rate / PEAK_FLOPS,
            "step_seconds": seconds / (steps - warmup), "tokens_per_step": tokens / (steps - warmup),
            "mean_loss": result.training_loss, "peak_memory_gb": peak_memory_gb(), **extra}


def run_hf_trainer(model_path: Path, model_name: str, examples: list[dict], steps: int, warmup: int, batch: int,
                   work: Path) -> dict:
    """The common SFT recipe: Trainer, padding collator, bf16 autocast, fused AdamW, SDPA."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from peers import padding_collator   # bench/, beside this script

    rows = [{"input_ids": e["input_ids"], "labels": [-100] * e["prompt"] + e["input_ids"][e["prompt"]:]}
            for e in examples]
    counted: list[int] = []
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32, attn_implementation="sdpa")
    timer = step_timer(warmup, steps)
    trainer = Trainer(model=model, args=peer_arguments(TrainingArguments, work / "hf", steps, batch,
                                                       remove_unused_columns=False),
                      train_dataset=rows, data_collator=padding_collator(2, counted), callbacks=[timer])
    result = trainer.train()
    return peer_result(model_name, result, timer, counted, steps, warmup, batch=batch)


def run_trl(model_path: Path, model_name: str, context: int, examples: list[dict], steps: int, warmup: int,
            rows: int, work: Path) -> dict:
    """TRL's SFTTrainer with packing (its default best-fit packing, flattened batches without padding), prompts
    masked, SDPA, `rows` packed rows of `context` tokens a step."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data = datasets.Dataset.from_list([{"input_ids": e["input_ids"],
                                        "completion_mask": [0] * e["prompt"] + [1] * (len(e["input_ids"]) - e["prompt"])}
                                       for e in examples])
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32, attn_implementation="sdpa")
    timer = step_timer(warmup, steps)
    config = peer_arguments(SFTConfig, work / "trl", steps, rows, packing=True, max_length=context,
                            completion_only_loss=True, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(str(model_path)), callbacks=[timer])
    counted: list[int] = []
    collate = trainer.data_collator

    def counting(features):   # the real tokens of each batch the trainer takes
        batch = collate(features)
        mask = batch.get("attention_mask")
        counted.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    result = trainer.train()
    return peer_result(model_name, result, timer, counted, steps, warmup, rows=rows)


def contender(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    examples = examples_for(MODELS[args.model_name]["vocab_size"], args.examples, args.context,
                            mean_fraction=args.mean_fraction)
    model_path = build_model(args.model_name, work / f"model-{args.model_name}", args.context)
    with tempfile.TemporaryDirectory(dir=work) as run_work:   # rows and outputs; the model stays for the next
        if args.only == "ours":
            return run_ours(model_path, args.model_name, args.context, examples, args.steps, args.warmup,
                            Path(run_work))
        # The peers read what their steps take, twice over (packing all of a large dataset would only add to TRL's
        # start-up): the Trainer `batch` examples a step, TRL `batch` rows of `context` tokens.
        if args.only == "trl":
            rows_worth = args.context / mean_length(args.context, args.mean_fraction)   # examples a row holds
            needed = math.ceil(2 * args.steps * args.batch * rows_worth)
            return run_trl(model_path, args.model_name, args.context, examples[:needed], args.steps, args.warmup,
                           args.batch, Path(run_work))
        return run_hf_trainer(model_path, args.model_name, examples[:2 * args.steps * args.batch], args.steps,
                              args.warmup, args.batch, Path(run_work))


# Variants of ours: the settings a trainer worker reads from its environment.
VARIANTS = {"sdpa": {"RAY_FINETUNE_ATTENTION": "sdpa"}, "compiled": {"RAY_FINETUNE_COMPILE": "on"},
            "checkpointed": {"RAY_FINETUNE_ACTIVATION_CHECKPOINTING": "on"},   # what recomputation costs
            "zero3": {"RAY_FINETUNE_ZERO_STAGE": "3"},                          # ZeRO-3's overhead on one GPU
            # Micro-batches of at most 16k tokens: the first lease's 32k (what the search settled on at every
            # context) took 74-79 GB against the HF Trainer's 68; does half the memory for activations cost speed?
            "micro16k": {"RAY_FINETUNE_MICRO_BATCH_TOKENS": "16384"},
            # The micro-batch as large as fits (the search before it stopped where a larger size no longer pays):
            # what the smaller micro-batch, and so more of them a step, costs the whole step.
            "largest": {"GPU_BENCH_LARGEST_MICRO_BATCH": "1"},
            # DeepSpeed's BF16 optimizer (ZeRO-1) instead of ZeRO-2's, which on one GPU has nothing to shard but
            # still moves every micro-batch's gradients through its buckets.
            "zero1": {"RAY_FINETUNE_ZERO_STAGE": "1"},
            "profiled": {"GPU_BENCH_PROFILE": "1"}}    # where the step's time goes (class Profile)


# When set (--deadline), the monotonic time by which every contender must have finished: a GPU lease is minutes
# long, and what was measured before it ends must reach $OUT rather than die with a killed script.
DEADLINE: float | None = None


def launch(work: Path, who: str, model_name: str, context: int, examples: int, steps: int, warmup: int,
           batch: int = 8, mean_fraction: float = 0.12, timeout: float = 600, env: dict | None = None) -> dict:
    if DEADLINE is not None:
        timeout = min(timeout, DEADLINE - time.monotonic())
        if timeout < 40:   # not enough for a process to load a model and take a few steps
            return {"skipped": "the deadline came first"}
    command = [sys.executable, __file__, "--only", who, "--work", str(work), "--model-name", model_name,
               "--context", str(context), "--examples", str(examples), "--steps", str(steps), "--warmup",
               str(warmup), "--batch", str(batch), "--mean-fraction", str(mean_fraction)]
    started = time.perf_counter()
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": output.stderr[-3000:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    print(who, model_name, context, json.dumps(result), flush=True)
    return result


def environment() -> dict:
    import torch
    import transformers

    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__}


def scaling_row(work: Path, model_name: str, context: int, on_gpu: bool) -> dict:
    """Ours at one model shape and context: on a GPU about 64k tokens a step whatever the context (at most the plan's
    64 rows: 32k at 512); on CPU one row."""
    from ray_finetune.train.plan import MAX_GLOBAL_BATCH_ROWS

    count = examples_for_batch(min(MAX_GLOBAL_BATCH_ROWS, 65536 // context), context) if on_gpu else 48
    steps, warmup = (5, 2) if on_gpu else (3, 1)
    result = launch(work, "ours", model_name, context, count, steps=steps, warmup=warmup, mean_fraction=0.12,
                    timeout=600 if on_gpu else 1200)
    return {"model": model_name, "context": context, **result}


def compare(args: argparse.Namespace, work: Path, summary: dict, save) -> None:
    """Ours against the HF Trainer with a padding collator, then ours in each asked-for variant."""
    if args.tiny:   # the settings every later contender of this invocation reads too
        args.model_name, args.steps, args.warmup, args.examples = "tiny", 6, 2, 400
        args.context = min(args.context, 512)
    model_name, steps, warmup, examples = args.model_name, args.steps, args.warmup, args.examples
    summary.update({"model": model_name, "context": args.context})
    ours = summary["ours"] = launch(work, "ours", model_name, args.context, examples, steps, warmup)
    save()
    # The HF Trainer takes `batch` examples a step; give it as many steps' worth of examples as it needs.
    peer = summary["hf_trainer_padded"] = launch(work, "hf", model_name, args.context, examples, steps * 5,
                                                 warmup * 5, batch=args.batch)
    if "useful_tokens_per_s" in ours and "useful_tokens_per_s" in peer:
        summary["ratio_ours_over_hf_trainer"] = round(ours["useful_tokens_per_s"] / peer["useful_tokens_per_s"], 2)
        if ours.get("peak_memory_gb") and peer.get("peak_memory_gb"):
            summary["memory_ours_over_hf_trainer"] = round(ours["peak_memory_gb"] / peer["peak_memory_gb"], 2)
        if ours.get("training_peak_memory_gb") and peer.get("peak_memory_gb"):   # ours without its set-up's trials
            summary["training_memory_ours_over_hf_trainer"] = round(
                ours["training_peak_memory_gb"] / peer["peak_memory_gb"], 2)
    save()
    if args.trl:
        compare_with_trl(args, work, summary)
        save()
    for variant in filter(None, args.variants.split(",")):
        summary[f"ours_{variant}"] = launch(work, "ours", model_name, args.context, examples, steps, warmup,
                                            env=VARIANTS[variant])
        save()


def compare_with_trl(args: argparse.Namespace, work: Path, summary: dict) -> None:
    """TRL's SFTTrainer with packing, 8 packed rows a step (needs trl and datasets; the GPU image has neither,
    bench/gpu_wheels.sh fetches them)."""
    peer = summary["trl_packed"] = launch(work, "trl", args.model_name, args.context, args.examples, args.steps * 2,
                                          args.warmup * 2, batch=8)
    ours = summary.get("ours", {})
    if "useful_tokens_per_s" in ours and "useful_tokens_per_s" in peer:
        summary["ratio_ours_over_trl_packed"] = round(ours["useful_tokens_per_s"] / peer["useful_tokens_per_s"], 2)


# What a GPU lease measures after the comparison, most wanted first, until the deadline. The first lease
# (2026-12-04, BENCHMARKS.md) measured the 1B shape at 512 and 8192 and the small one at 2048, and left unsettled
# where the step's time goes (33% MFU against the 45% wanted), whether smaller micro-batches (less memory than the
# HF Trainer's) would cost speed, whether compiled decoder layers pay, and had no TRL peer; so: those, then what it
# could not reach, then the rows it has.
SESSION_EXTRAS = (("variant", "compiled"), ("variant", "largest"), ("variant", "profiled"), ("peer", "trl"),
                  ("variant", "zero1"), ("variant", "micro16k"), ("variant", "sdpa"),
                  ("scaling", "llama-1b", 4096), ("scaling", "smollm2-135m", 8192), ("scaling", "smollm2-135m", 512),
                  ("scaling", "llama-1b", 8192), ("scaling", "llama-1b", 512), ("scaling", "smollm2-135m", 2048))


def measure(args: argparse.Namespace, work: Path, summary: dict, save) -> None:
    """Fills `summary`, calling `save` after each contender."""
    import torch

    on_gpu = torch.cuda.is_available() and not args.tiny
    if args.session:
        compare(args, work, summary, save)
        extras = [("scaling", "tiny", 256), ("variant", "profiled")] if args.tiny else list(SESSION_EXTRAS)
        if "useful_tokens_per_s" not in summary["ours"]:   # learn at once whether FlexAttention is what failed
            extras.insert(0, ("variant", "sdpa"))
        table = summary["scaling"] = []
        for kind, *what in extras:
            if kind == "variant" and f"ours_{what[0]}" not in summary:
                summary[f"ours_{what[0]}"] = launch(work, "ours", summary["model"], args.context, args.examples,
                                                    args.steps, args.warmup, env=VARIANTS[what[0]])
            elif kind == "peer" and "trl_packed" not in summary:
                compare_with_trl(args, work, summary)
            elif kind == "scaling":
                table.append(scaling_row(work, *what, on_gpu=on_gpu))
            save()
    elif args.scaling:
        sizes = ((("tiny", (256, 512)),) if args.tiny else
                 (("smollm2-135m", (512, 2048, 8192)), ("llama-1b", (512, 2048, 4096, 8192))) if on_gpu else
                 (("tiny", (512, 2048, 8192)), ("smollm2-135m", (512, 2048, 8192))))   # a 1B model: 16 GB of state
        table = summary["scaling"] = []
        for model_name, contexts in sizes:
            for context in contexts:
                table.append(scaling_row(work, model_name, context, on_gpu))
                save()
    else:
        compare(args, work, summary, save)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a small config that runs on CPU in about a minute")
    parser.add_argument("--scaling", action="store_true", help="ours only: step time and memory by context length")
    parser.add_argument("--only", choices=["ours", "hf", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model-name", default="llama-1b", choices=sorted(MODELS))
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--examples", type=int, help="default: enough for the plan's full batch (64 rows a step), "
                        "as on a large dataset")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="the HF Trainer's examples per step")
    parser.add_argument("--mean-fraction", type=float, default=0.12, help=argparse.SUPPRESS)
    parser.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--trl", action="store_true", help="also TRL's SFTTrainer with packing (needs trl)")
    parser.add_argument("--session", action="store_true",
                        help="the comparison, then scaling rows and variants by priority until --deadline")
    parser.add_argument("--deadline", type=float, help="seconds from now by which every contender must be done")
    args = parser.parse_args()
    if args.examples is None:
        from ray_finetune.train.plan import MAX_GLOBAL_BATCH_ROWS

        args.examples = examples_for_batch(MAX_GLOBAL_BATCH_ROWS, args.context, args.mean_fraction)
    if args.only:
        print("RESULT " + json.dumps(contender(args)), flush=True)
        return
    global DEADLINE
    if args.deadline:
        DEADLINE = time.monotonic() + args.deadline
    name = "gpu_bench_scaling.json" if args.scaling and not args.session else "gpu_bench.json"
    summary: dict = {**environment(), "command": " ".join(["python", "bench/gpu_bench.py"] + sys.argv[1:])}

    def save() -> None:   # after each contender: a lease that ends mid-way still returns what was measured
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], name).write_text(json.dumps(summary, indent=1))

    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as work:   # models built here: GBs each
        measure(args, Path(work), summary, save)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
