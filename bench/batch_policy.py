"""How many optimizer steps an epoch of a small dataset should take: the same data, model, learning rate and tokens
(one epoch), trained with different global batch sizes, and the held-out eval loss each one reaches.

ray_finetune chooses the batch (train/plan.choose_global_batch_rows: the largest power of two that leaves at least
TARGET_STEPS_PER_EPOCH steps an epoch, at most MAX_GLOBAL_BATCH_ROWS rows); this measures that choice against
others on real data, with the code a trainer worker runs (`loop.train`, without Ray).

    python bench/batch_policy.py --batches policy,8,2,1 --learning-rate 5e-6
        # 300 chitchat conversations to train on, 40 held out (pip install chitchat-dataset; MIT licence)
    python bench/batch_policy.py --train train.jsonl --eval eval.jsonl    # chats of your own

Each batch size runs in its own process, one after another (a fresh model, the same seed). Prints, per batch size:
steps, eval loss before and after, the mean train loss over the epoch's last quarter of steps, and the time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def chitchat_files(folder: Path) -> tuple[str, str]:
    """Records 100-399 of the chitchat conversations for training and the first 40 held out, converted as
    examples/make_demo_data.py converts them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import chitchat_dataset
    from make_demo_data import to_record

    records = [r for r in (to_record(c) for _, c in sorted(chitchat_dataset.Dataset().items())) if r]
    paths = []
    for name, chunk in (("train.jsonl", records[100:400]), ("eval.jsonl", records[:40])):
        (folder / name).write_text("".join(json.dumps(record) + "\n" for record in chunk))
        paths.append(str(folder / name))
    return paths[0], paths[1]


def prepared(parameter: str, path: str, model_path: str, context: int, cache: Path) -> tuple[str, dict]:
    from ray_finetune.data.prepare import prepare
    from ray_finetune.train.models import load_tokenizer

    result = prepare(parameter, path, task_type="CHAT_COMPLETION", model_path=model_path,
                     tokenizer=load_tokenizer(model_path), context_length=context, cache_dir=cache)
    return result.rows_path, result.stats


def train_once(args: argparse.Namespace, batch: str, work: Path) -> dict:
    import time

    from ray_finetune.spec import Duration
    from ray_finetune.train import loop
    from ray_finetune.train.distributed import join_process_group
    from ray_finetune.train.models import resolve_model
    from ray_finetune.train.plan import make_plan

    model_path = str(resolve_model(args.model).path)
    train_rows, stats = prepared("train_data_path", args.train, model_path, args.context, work / "cache")
    eval_rows, _ = prepared("eval_data_path", args.eval, model_path, args.context, work / "cache")
    plan = make_plan(rows=stats["rows"], tokens=stats["tokens"], duration=Duration(value=1, unit="ep"),
                     world_size=1, seed=0, global_batch_rows=None if batch == "policy" else int(batch))
    join_process_group(0, 1)
    steps, evaluations = [], []

    class Collect(loop.SilentReporter):
        def step_finished(self, report): steps.append(report)
        def evaluated(self, step, epoch, result): evaluations.append((step, result.loss))

    config = loop.TrainConfig(
        run_name="batch-policy", model_path=model_path, init_weights_path=None, train_rows_path=train_rows,
        plan=plan, learning_rate=args.learning_rate, save_folder=str(work / "runs"), rank=0, world_size=1, seed=0,
        checkpoint_every=Duration(value=plan.total_steps, unit="ba"), checkpoints_to_keep=1,
        eval_rows_path=eval_rows, evaluate_first=True)
    started = time.monotonic()
    loop.train(config, Collect())
    last_quarter = steps[-max(1, len(steps) // 4):]
    return {"batch": batch, "global_batch_rows": plan.global_batch_rows, "rows": plan.rows,
            "tokens": stats["tokens"], "steps": plan.total_steps, "learning_rate": args.learning_rate,
            "eval_loss_before": evaluations[0][1], "eval_loss_after": evaluations[-1][1],
            "train_loss_last_quarter": sum(r.loss * r.target_tokens for r in last_quarter)
            / sum(r.target_tokens for r in last_quarter),
            "seconds": round(time.monotonic() - started, 1)}


def batch_list(text: str) -> list[str]:
    batches = [item.strip() for item in text.split(",")]
    if not all(item == "policy" or (item.isdigit() and int(item) > 0) for item in batches):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'policy' or positive row counts, e.g. policy,2,1")
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--train", help="chat .jsonl to train on (default: 300 chitchat conversations)")
    parser.add_argument("--eval", help="chat .jsonl held out (default: 40 other chitchat conversations)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--batches", default="policy,2,1", type=batch_list,
                        help="comma-separated: 'policy' (ray_finetune's choice) or rows a step")
    parser.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one batch size in this process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(train_once(args, args.one, Path(args.work))), flush=True)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="batch-policy-") as work:
        if not args.train or not args.eval:
            args.train, args.eval = chitchat_files(Path(work))
        for batch in args.batches:
            command = [sys.executable, __file__, "--model", args.model, "--train", args.train, "--eval", args.eval,
                       "--context", str(args.context), "--learning-rate", str(args.learning_rate), "--one", batch,
                       "--work", work]
            output = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
            if output.returncode or not lines:
                sys.exit(f"batch {batch} failed:\n{output.stderr[-4000:]}")
            results.append(json.loads(lines[-1][len("RESULT "):]))
            print(json.dumps(results[-1]), flush=True)
            shutil.rmtree(Path(work) / "runs", ignore_errors=True)   # a SmolLM2 checkpoint takes 2 GB
    print("\n| global batch (rows) | steps | eval loss before → after | train loss, last quarter | time |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        name = f"{r['global_batch_rows']} ({'policy' if r['batch'] == 'policy' else 'set'})"
        print(f"| {name} | {r['steps']} | {r['eval_loss_before']:.4f} → {r['eval_loss_after']:.4f} | "
              f"{r['train_loss_last_quarter']:.4f} | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
