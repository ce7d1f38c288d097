"""What a checkpoint on object storage costs training: ray_finetune (written, then uploaded while training goes on)
against uploading it before training goes on (ray_finetune before 2026-12-07) and against the plain-PyTorch peer
(`torch.save` of model and optimizer to local disk, then the file put in the bucket: what a script around a
Trainer does), in the same process, against an S3 server (moto's, in a process of its own on this machine).

For each: the time from the checkpoint's start until training has done `--steps` more steps and the checkpoint is
complete in the bucket, and what of it is lost to the checkpoint (that time minus `--steps` steps at the rate
measured without any checkpoint); for the upload alone, the CPU time it took in this process (the client's work:
reading, checksums, HTTP), against its wall time (the rest is waiting for the store). Note that the S3 server here
shares this machine's cores: on a small box its work takes the cores training would use.

    python bench/upload_bench.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--context 512] [--steps 6]
                                 [--server-apart]

`--server-apart` gives the S3 server a core of its own (the last; training gets the others), as a real object store
runs on machines of its own; otherwise, on a small box, the server's work (moto is Python) takes the cores training
would use, and what the background saves is spent there.

Needs the test extra (moto[server]).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from checkpoint_bench import Training  # sets the single-process DeepSpeed environment first

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from object_store import s3_server  # noqa: E402
from ray_finetune import storage  # noqa: E402
from ray_finetune.train import loop  # noqa: E402
from ray_finetune.train.publishing import Publisher  # noqa: E402

BUCKET = "bench"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="steps trained after each checkpoint")
    parser.add_argument("--server-apart", action="store_true", help="the S3 server on a core of its own")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    server_cores = {cores[-1]} if args.server_apart and len(cores) > 1 else None
    if server_cores:   # before the training threads start
        os.sched_setaffinity(0, set(cores) - server_cores)
        import fsspec.config

        # moto on one core takes minutes to assemble a multipart upload: the client must wait for its answer
        fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", {})["read_timeout"] = 1800
    training = Training(args.model, args.context, steps=1000)
    engine, tokenizer, optimizer, train = training.engine, training.tokenizer, training.optimizer, training.train
    train(3)   # warm-up; optimizer state exists only after a step
    step_s = train(args.steps) / args.steps

    with s3_server(BUCKET, server_cores) as aws, tempfile.TemporaryDirectory(prefix="upload-bench-") as work:
        os.environ.update(aws)
        os.environ[storage.MIRROR_ENV] = str(Path(work) / "mirror")
        save_folder = f"s3://{BUCKET}/runs"
        config = loop.TrainConfig(run_name="bench", model_path=str(training.model_path), init_weights_path=None,
                                  train_rows_path="", plan=training.plan, learning_rate=1e-5, save_folder=save_folder,
                                  rank=0, world_size=1, seed=0, checkpoints_to_keep=1)
        published = []
        publisher = Publisher(save_folder, "bench", rank=0, keep=1, report=published.append)

        def ours(upload_first: bool) -> dict:
            started = time.perf_counter()
            loop.save_checkpoint(engine, tokenizer, config, publisher, epoch=0, step=training.steps_done)
            paused = time.perf_counter() - started
            client_cpu_s = None
            if upload_first:   # as before: training waits for the bucket
                cpu_started = time.process_time()   # nothing else runs in this process meanwhile
                publisher.finish()
                client_cpu_s = round(time.process_time() - cpu_started, 2)
                paused = time.perf_counter() - started
            train(args.steps)
            publisher.finish()
            total = time.perf_counter() - started
            return {"paused_s": round(paused, 2), "upload_s": round(published[-1].upload_seconds, 2),
                    "total_s": round(total, 2), "lost_s": round(total - args.steps * step_s, 2),
                    **({"upload_client_cpu_s": client_cpu_s} if upload_first else {})}

        def peer() -> dict:
            import fsspec

            started = time.perf_counter()
            local = Path(work) / "peer.pt"
            torch.save({"model": engine.module.state_dict(), "optimizer": optimizer.state_dict()}, local)
            fsspec.filesystem("s3").put_file(str(local), f"{BUCKET}/peer/step-{training.steps_done}.pt")
            paused = time.perf_counter() - started
            train(args.steps)
            total = time.perf_counter() - started
            return {"paused_s": round(paused, 2), "total_s": round(total, 2),
                    "lost_s": round(total - args.steps * step_s, 2)}

        rounds = []
        for _ in range(2):   # alternated, so that the box's drift reaches all three
            rounds.append({"ours_background": ours(upload_first=False), "ours_upload_first": ours(upload_first=True),
                           "peer_torch_save_then_put": peer()})
        size_mb = storage.size(published[-1].path) / 2**20
    for measured in rounds:
        measured["lost_ratio_background_over_upload_first"] = round(
            measured["ours_background"]["lost_s"] / measured["ours_upload_first"]["lost_s"], 2)
        measured["lost_ratio_background_over_peer"] = round(
            measured["ours_background"]["lost_s"] / measured["peer_torch_save_then_put"]["lost_s"], 2)
    print(json.dumps({"model": args.model, "context": args.context, "server_apart": bool(server_cores),
                      "training_threads": torch.get_num_threads(), "step_s": round(step_s, 2),
                      "steps_after_each_checkpoint": args.steps, "checkpoint_mb": round(size_mb, 1),
                      "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
