"""Training throughput on CPU: ray_finetune's training step against the Hugging Face Trainer with a padding
collator (the common SFT recipe) and TRL's SFTTrainer with packing, in one invocation, on the same model, the same
examples (lognormal lengths around 300 tokens, prompts masked), one epoch each (so the same target tokens) and the
same hyperparameters. Prints useful (non-padding) tokens/s, peak RSS, mean train loss, and the ratios.

    python bench/throughput_cpu.py --model tiny       # a 1M-parameter Llama built here (about a minute)
    python bench/throughput_cpu.py --model smollm2    # SmolLM2-135M-Instruct (a few minutes)
    python bench/throughput_cpu.py --model smollm2 --precision bf16   # all three in bf16 (fp32 master weights)
    python bench/throughput_cpu.py --model smollm2 --variants checkpointed,zero3   # also ours recomputing
                                        # activations / under ZeRO-3 (one process: its bookkeeping, whole rows)
    python bench/throughput_cpu.py --model smollm2 --variants passes   # also ours running one forward pass per
                                        # document instead of per-document attention
    python bench/throughput_cpu.py --model smollm2 --rounds 3   # every contender three times, alternating; the
                                        # median of the rounds' ratios (this box's speed drifts by the minute)
    python bench/throughput_cpu.py --model smollm2 --variants system_allocator   # also ours with the allocator
                                        # its process starts with (the others: train/allocator.py)
    python bench/throughput_cpu.py --model smollm2 --peers-allocator ours   # the peers with that allocator too

ours runs with the allocator ray_finetune gives its CPU trainer processes (TCMalloc when installed); the peers, as
their users run them, with the one they start with.

TRL's packing on CPU (no FlashAttention) lets packed examples attend to each other; ray_finetune's does not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ray_finetune.train.allocator import in_use, trainer_environment  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

LEARNING_RATE = 5e-5


def examples_for(vocab: int, count: int, context: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    sigma = 0.6
    lengths = np.clip(rng.lognormal(math.log(300) - sigma**2 / 2, sigma, count).astype(int), 16, context)
    out = []
    for length in lengths:
        prompt = max(1, int(length * rng.uniform(0.2, 0.5)))
        ids = rng.integers(5, vocab, length).tolist()
        out.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (length - prompt)})
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(model_path: Path, data: list[dict], context: int, work: Path) -> dict:
    import torch.distributed as dist

    from ray_finetune.data.formats import TokenizedExample
    from ray_finetune.data.packing import pack_examples
    from ray_finetune.spec import Duration
    from ray_finetune.train import loop
    from ray_finetune.train.distributed import join_process_group
    from ray_finetune.train.models import load_tokenizer
    from ray_finetune.train.plan import make_plan

    if not dist.is_initialized():
        join_process_group(0, 1)
    tokenizer = load_tokenizer(model_path)
    examples = [TokenizedExample(e["input_ids"], [bool(m) for m in e["completion_mask"]]) for e in data]
    rows, stats = pack_examples(examples, context, tokenizer.pad_token_id)
    rows.save(work / "rows")
    plan = make_plan(rows=len(rows), tokens=stats.tokens, duration=Duration(value=1, unit="ep"), world_size=1,
                     seed=0)
    reports = []

    class Collect(loop.SilentReporter):
        def step_finished(self, report): reports.append(report)

    config = loop.TrainConfig(run_name="bench", model_path=str(model_path), init_weights_path=None,
                              train_rows_path=str(work / "rows"), plan=plan, learning_rate=LEARNING_RATE,
                              save_folder=str(work / "ours"), rank=0, world_size=1, seed=0)
    loop.train(config, Collect())
    seconds = sum(r.step_seconds for r in reports)
    tokens = sum(r.tokens for r in reports)
    target = sum(r.target_tokens for r in reports)
    return {"useful_tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "target_tokens": target,
            "mean_loss": sum(r.loss * r.target_tokens for r in reports) / target, "steps": len(reports),
            "rows_per_step": plan.global_batch_rows, "packing_efficiency": round(stats.packing_efficiency, 4),
            "peak_rss_mb": peak_rss_mb()}


def _trainer_arguments(cls, work: Path, batch: int, **extra):
    extra.setdefault("bf16", os.environ.get("RAY_FINETUNE_PRECISION") == "bf16")   # the Trainer's autocast
    return cls(output_dir=str(work), per_device_train_batch_size=batch, num_train_epochs=1,
               learning_rate=LEARNING_RATE, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, warmup_steps=0.02,
               lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
               use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, **extra)


def run_hf_trainer(model_path: Path, data: list[dict], batch: int, work: Path) -> dict:
    import datasets
    from transformers import Trainer, TrainingArguments

    from ray_finetune.train.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    rows = [{"input_ids": e["input_ids"],
             "labels": [t if m else -100 for t, m in zip(e["input_ids"], e["completion_mask"])]} for e in data]

    from peers import padding_collator   # bench/, beside this script

    pad_collator = padding_collator(tokenizer.pad_token_id)

    trainer = Trainer(model=load_model(model_path), args=_trainer_arguments(TrainingArguments, work / "hf", batch),
                      train_dataset=datasets.Dataset.from_list(rows), data_collator=pad_collator)
    result = trainer.train()
    tokens = sum(len(e["input_ids"]) for e in data)
    return {"useful_tokens_per_s": tokens / result.metrics["train_runtime"], "seconds": result.metrics["train_runtime"],
            "tokens": tokens, "mean_loss": result.training_loss, "batch": batch, "peak_rss_mb": peak_rss_mb()}


def run_trl(model_path: Path, data: list[dict], context: int, batch_rows: int, work: Path) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from ray_finetune.train.models import load_model, load_tokenizer

    config = _trainer_arguments(SFTConfig, work / "trl", batch_rows, packing=True, max_length=context,
                                completion_only_loss=True, dataset_num_proc=None)
    trainer = SFTTrainer(model=load_model(model_path), args=config, train_dataset=datasets.Dataset.from_list(data),
                         processing_class=load_tokenizer(model_path))
    result = trainer.train()
    tokens = sum(len(e["input_ids"]) for e in data)
    return {"useful_tokens_per_s": tokens / result.metrics["train_runtime"], "seconds": result.metrics["train_runtime"],
            "tokens": tokens, "mean_loss": result.training_loss, "batch_rows": batch_rows,
            "peak_rss_mb": peak_rss_mb(), "examples_see_each_other": True}


# Variants of ours: the settings a trainer reads from its environment.
VARIANTS = {"checkpointed": {"RAY_FINETUNE_ACTIVATION_CHECKPOINTING": "on"}, "zero3": {"RAY_FINETUNE_ZERO_STAGE": "3"},
            # one forward pass per document, as CPUs trained before per-document attention (and still do for a
            # model it cannot run)
            "passes": {"RAY_FINETUNE_ATTENTION": "sdpa"},
            # the allocator the trainer process starts with, as it is (train/allocator.py)
            "system_allocator": {"RAY_FINETUNE_ALLOCATOR": "system"}}


def run_contender(args: argparse.Namespace, count: int, work: Path) -> dict:
    if args.model == "tiny":
        from tiny_model import build_tiny_model

        model_path = build_tiny_model(work / "tiny", vocab_size=2048, hidden_size=128, layers=4,
                                      max_positions=args.context)
    else:
        from ray_finetune.train.models import resolve_model

        model_path = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").path
    vocab = json.loads((model_path / "config.json").read_text())["vocab_size"]
    data = examples_for(vocab, count, args.context)
    if args.only == "ours":
        return run_ours(model_path, data, args.context, work)
    from ray_finetune.data.formats import TokenizedExample
    from ray_finetune.data.packing import pack_examples
    from ray_finetune.train.plan import choose_global_batch_rows

    rows, stats = pack_examples([TokenizedExample(e["input_ids"], [True] * len(e["input_ids"])) for e in data],
                                args.context, 0)
    ours_plan_rows = choose_global_batch_rows(len(rows), 1)
    tokens_per_step = ours_plan_rows * args.context * stats.packing_efficiency
    batch = max(1, round(tokens_per_step / np.mean([len(e["input_ids"]) for e in data])))
    return (run_hf_trainer(model_path, data, batch, work) if args.only == "hf"
            else run_trl(model_path, data, args.context, ours_plan_rows, work))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--only", choices=["ours", "hf", "trl"], default=None, help="run one contender (internal)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--peers-allocator", choices=["system", "ours"], default="system",
                        help="run the peers with the allocator they start with (as users run them), or with the "
                        "one ray_finetune's CPU trainers get")
    parser.add_argument("--rounds", type=int, default=1, help="run every contender this many times, alternating; "
                        "ratios are the median of the rounds' own ratios")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    os.environ["RAY_FINETUNE_PRECISION"] = args.precision   # ours reads it; the peers get bf16=True from it
    torch.set_num_threads(os.cpu_count() or 1)
    count = args.examples or (800 if args.model == "tiny" else 48)
    if args.only:   # one contender per process, so peak memory is its own
        with tempfile.TemporaryDirectory(prefix="throughput-") as work:   # its rows and checkpoint: GBs each
            print("RESULT " + json.dumps({**run_contender(args, count, Path(work)), "allocator": in_use()}))
        return
    import subprocess

    def allocator_for(variant: dict[str, str]) -> dict[str, str]:   # what the scheduler gives a CPU trainer
        return trainer_environment(on_gpus=False, choice=variant.get("RAY_FINETUNE_ALLOCATOR", "auto"))

    peers = allocator_for({}) if args.peers_allocator == "ours" else {}
    runs = [("ours", "ours", allocator_for({})), ("hf", "hf", peers), ("trl", "trl", peers)]
    runs += [(f"ours_{variant}", "ours", {**VARIANTS[variant], **allocator_for(VARIANTS[variant])})
             for variant in filter(None, args.variants.split(","))]
    rounds = []
    for _ in range(args.rounds):   # contenders alternate, so a drift of the machine's speed reaches all of them
        results = {}
        for name, contender, env in runs:
            output = subprocess.run([sys.executable, __file__, "--model", args.model, "--context", str(args.context),
                                     "--examples", str(count), "--only", contender, "--precision", args.precision],
                                    capture_output=True, text=True, env={**os.environ, **env})
            line = [l for l in output.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"{name} failed:\n{output.stderr[-4000:]}")
            results[name] = json.loads(line[0][len("RESULT "):])
        rounds.append(results)

    def ratios(top: str, bottom: str) -> list[float]:   # each round's own ratio
        return [round(r[top]["useful_tokens_per_s"] / r[bottom]["useful_tokens_per_s"], 2) for r in rounds]

    def ratio(top: str, bottom: str) -> float:
        return round(float(np.median(ratios(top, bottom))), 2)

    summary = {
        "model": args.model, "examples": count, "context": args.context, "threads": os.cpu_count(),
        "precision": args.precision,
        "results": [{k: {m: (round(v, 3) if isinstance(v, float) else v) for m, v in r.items()}
                     for k, r in results.items()} for results in rounds],
        "ratio_ours_over_hf_trainer": ratio("ours", "hf"),
        "ratio_ours_over_trl_packed": ratio("ours", "trl"),
        **{f"ratio_{name}_over_ours": ratio(name, "ours") for name in rounds[0] if name.startswith("ours_")},
    }
    if args.rounds > 1:
        summary["ratio_ours_over_hf_trainer_by_round"] = ratios("ours", "hf")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
