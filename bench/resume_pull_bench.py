"""What a node downloads to resume a run from object storage: ray_finetune (only what the node's ranks load: the
shared DeepSpeed files and its own ranks' ZeRO partitions) against pulling the whole checkpoint folder (ray_finetune
before 2026-12-07, and what a script that syncs the checkpoint folder down before loading does), in the same
process, against an S3 server (moto's, in a process of its own on this machine).

A real checkpoint is written first: two ranks (two processes, one gloo group) train one ZeRO-2 step of the model
and save it through ray_finetune's own save path into the bucket. Then each contender pulls it into an empty mirror
(a node that has nothing), two rounds, alternated: bytes on the node's disk and seconds. Also printed: the
checkpoint's files by kind, from which a node's share in a group of N nodes (one rank each) follows. Then the same
for a run resumed on another number of workers, once rank 0 has converted the checkpoint to DeepSpeed's universal
layout: what a node other than rank 0's downloads (the conversion only, against every rank's partition as well).

    python bench/resume_pull_bench.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--context 256] [--zero-stage 2]

Needs the test extra (moto[server]).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BUCKET, RUNS = "bench", "s3://bench/runs"
WORLD = 2


def write_checkpoint(rank: int, port: int, model: str, context: int, stage: int,
                     environment: dict[str, str]) -> None:
    """One rank of a two-rank ZeRO group: one step on random tokens, then ray_finetune's checkpoint into the
    bucket (both ranks on one "node": one mirror)."""
    os.environ.update(environment, DS_ACCELERATOR="cpu")
    import numpy as np
    import torch

    from ray_finetune.data.formats import TokenizedExample
    from ray_finetune.data.packing import pack_examples
    from ray_finetune.spec import parse_duration
    from ray_finetune.train import hardware, loop
    from ray_finetune.train.distributed import join_process_group
    from ray_finetune.train.models import load_model, load_tokenizer, resolve_model
    from ray_finetune.train.plan import make_plan
    from ray_finetune.train.publishing import Publisher
    from ray_finetune.train.step import CausalLMLoss, forward_loss, make_batch

    import deepspeed

    torch.set_num_threads(1)
    join_process_group(rank, WORLD, ("127.0.0.1", port))
    model_path = resolve_model(model).path
    tokenizer = load_tokenizer(model_path)
    rng = np.random.default_rng(0)
    examples = [TokenizedExample(rng.integers(10, min(40000, len(tokenizer)), context - 8).tolist(),
                                 [True] * (context - 8)) for _ in range(WORLD)]
    rows, stats = pack_examples(examples, context, tokenizer.pad_token_id)
    plan = make_plan(rows=len(rows), tokens=stats.tokens, duration=parse_duration("1ba"), world_size=WORLD, seed=0)
    module = load_model(model_path)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, betas=loop.BETAS, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=CausalLMLoss(module), optimizer=optimizer,
                                           config=hardware.deepspeed_config(plan, stage, hardware.FP32))
    for micro in plan.rank_micro_batches(0, rank):
        result = forward_loss(engine, make_batch(rows, micro))
        engine.backward(result.loss_sum / max(result.target_tokens, 1), scale_wrt_gas=False)
        engine.step()
    config = loop.TrainConfig(run_name="bench", model_path=str(model_path), init_weights_path=None,
                              train_rows_path="", plan=plan, learning_rate=1e-5, save_folder=RUNS, rank=rank,
                              world_size=WORLD, seed=0)
    publisher = Publisher(RUNS, "bench", rank=rank, keep=1, report=lambda _: None)
    loop.save_checkpoint(engine, tokenizer, config, publisher, epoch=0, step=1)
    publisher.finish()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2, choices=(1, 2, 3))
    args = parser.parse_args()
    from object_store import s3_server

    from ray_finetune import storage
    from ray_finetune.train import checkpoint
    from ray_finetune.ports import free_port

    with s3_server(BUCKET) as aws, tempfile.TemporaryDirectory(prefix="resume-pull-bench-") as work:
        os.environ.update(aws)
        environment = {**aws, storage.MIRROR_ENV: str(Path(work) / "writer")}
        context = multiprocessing.get_context("spawn")
        port = free_port()
        ranks = [context.Process(target=write_checkpoint,
                                 args=(rank, port, args.model, args.context, args.zero_stage, environment))
                 for rank in range(WORLD)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join()
        assert all(p.exitcode == 0 for p in ranks), [p.exitcode for p in ranks]

        def checkpoint_folder() -> Path:   # this node's path of it: under the mirror in use now
            return checkpoint.checkpoints_dir(RUNS, "bench") / checkpoint.checkpoint_name(0, 1)

        import fsspec

        bucket = fsspec.filesystem("s3")
        remote = storage.location_of(checkpoint_folder()).removeprefix("s3://")
        kinds = {"shared": 0, "partitions": 0, "weights": 0}
        for name, size in ((path[len(remote) + 1:], bucket.size(path)) for path in bucket.find(remote)):
            kind = ("weights" if name.startswith(checkpoint.WEIGHTS_DIR + "/") else
                    "partitions" if name.startswith(("zero_pp_rank_", "bf16_zero_pp_rank_")) else "shared")
            kinds[kind] += size
        print(json.dumps({"checkpoint_bytes": kinds}), flush=True)

        def compare(contenders: dict) -> None:
            """Each contender pulls into an empty mirror, rounds alternated; the first is the baseline."""
            results: dict[str, list[dict]] = {name: [] for name in contenders}
            for round_ in range(args.rounds):
                for name, pull in (contenders.items() if round_ % 2 == 0 else reversed(contenders.items())):
                    mirror = Path(work) / f"node-{round_}-{len(results[name])}-{list(contenders).index(name)}"
                    os.environ[storage.MIRROR_ENV] = str(mirror)
                    folder = checkpoint_folder()
                    started = time.perf_counter()
                    pull(folder)
                    seconds = time.perf_counter() - started
                    results[name].append({"bytes": storage.size_here(folder), "seconds": round(seconds, 2)})
                    print(json.dumps({"round": round_ + 1, "contender": name, **results[name][-1]}), flush=True)
                    shutil.rmtree(mirror, ignore_errors=True)
            baseline = results[next(iter(contenders))]
            for name in list(contenders)[1:]:
                print(json.dumps({"contender": name,
                                  "bytes_ratio": round(results[name][0]["bytes"] / baseline[0]["bytes"], 3),
                                  "seconds_ratios": [round(ours["seconds"] / theirs["seconds"], 2)
                                                     for ours, theirs in zip(results[name], baseline)]}), flush=True)

        print("resuming on as many workers (2), one per node:", flush=True)
        compare({
            "whole folder": lambda folder: storage.pull(folder),
            "ours, rank 0's node": lambda folder: checkpoint.pull_to_resume(folder, (0,)),
            "ours, rank 1's node": lambda folder: checkpoint.pull_to_resume(folder, (1,)),
        })
        # On another number of workers rank 0 converts the checkpoint to DeepSpeed's universal layout and pushes it
        # (timed here once); every other node loads that conversion.
        os.environ[storage.MIRROR_ENV] = str(Path(work) / "converter")
        started = time.perf_counter()
        converted = checkpoint.universal(checkpoint_folder())
        print(json.dumps({"universal_conversion": {"seconds_with_its_pull_and_push": round(
            time.perf_counter() - started, 1), "bytes": storage.size_here(converted)}}), flush=True)
        shutil.rmtree(Path(work) / "converter", ignore_errors=True)
        print("resuming on another number of workers, a node other than rank 0's:", flush=True)
        compare({
            "every partition and the conversion (before 2026-12-07, a later session)":
                lambda folder: (checkpoint.pull_to_resume(folder, None), checkpoint.universal(folder)),
            "ours, the conversion only": lambda folder: checkpoint.universal(folder),
        })
        # A node of a group of N nodes, one rank each, resuming on as many: the shared files and 1/N of the
        # partitions (ZeRO divides the optimizer state evenly), against the whole folder
        total = sum(kinds.values())
        print(json.dumps({"per_node_share_of_the_whole_folder": {
            n: round((kinds["shared"] + kinds["partitions"] / n) / total, 3) for n in (2, 4, 8, 16)}}), flush=True)


if __name__ == "__main__":
    main()
