"""What a trainer rank holds once its model is loaded: the whole model (each rank loads it all, then DeepSpeed shards
it: what ray_finetune did before, and what a DeepSpeed script without zero.Init does) against ZeRO-3's sharded
loading (models.load_model with a ZeRO-3 config: each rank builds only its shard, rank 0 alone reads the files).
Two (--world) gloo ranks on CPU, in one invocation, from a bf16 checkpoint (as Hub checkpoints are) loaded in fp32 (CPU
training's precision): on CPU the training device's memory is the host's, so this is what each rank holds of the
model where it trains. Prints each rank's parameters held, peak and resident memory added by the load, the load
time, and the ratios.

    python bench/zero3_loading.py                   # SmolLM2-135M-Instruct
    python bench/zero3_loading.py --model tiny      # a 1M-parameter Llama built here
    python bench/zero3_loading.py --world 4         # four ranks
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

def _memory_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rank(rank: int, world: int, port: int, model_path: str, sharded: bool, out: str) -> None:
    import deepspeed  # noqa: F401 - imported before the baseline, as in a trainer
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401

    from ray_finetune.train.distributed import join_process_group
    from ray_finetune.train.models import load_model, parameter_count

    torch.set_num_threads(1)
    join_process_group(rank, world, ("127.0.0.1", port))
    parameter_count(model_path)   # as a trainer does before loading (and it imports the model's code)
    zero3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
             "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    before = _memory_kib("VmRSS")
    started = time.perf_counter()
    model = load_model(model_path, zero3_config=zero3 if sharded else None)
    dist.barrier()
    seconds = time.perf_counter() - started
    ctypes.CDLL("libc.so.6").malloc_trim(0)   # what the allocator keeps of freed memory is not held by the model
    held = sum(getattr(p, "ds_tensor", p).numel() for p in {id(p): p for p in model.parameters()}.values())
    Path(f"{out}.{rank}").write_text(json.dumps({
        "peak_mib": (_memory_kib("VmHWM") - before) / 1024, "resident_mib": (_memory_kib("VmRSS") - before) / 1024,
        "seconds": seconds, "parameters_held": held}))
    dist.destroy_process_group()


def measure(model_path: str, sharded: bool, world: int, work: Path) -> list[dict]:
    from ray_finetune.ports import free_port

    context = multiprocessing.get_context("spawn")
    port, out = free_port(), work / ("sharded" if sharded else "whole")
    processes = [context.Process(target=_rank, args=(rank, world, port, model_path, sharded, str(out)))
                 for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    if any(p.exitcode for p in processes):
        raise SystemExit(f"a rank failed: {[p.exitcode for p in processes]}")
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--world", type=int, default=2, help="ranks (processes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.model == "tiny":
            from tiny_model import build_tiny_model

            source = build_tiny_model(work / "tiny")
        else:
            from ray_finetune.train.models import resolve_model

            source = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").path
        model_path = _bf16_copy(source, work / "bf16")
        results = {way: measure(model_path, way == "sharded", args.world, work) for way in ("whole", "sharded")}
    print(f"model {args.model} (bf16 checkpoint, loaded in fp32), {args.world} ranks (gloo, CPU)")
    print(f"{'loading':<8} {'rank':>4} {'parameters held':>16} {'peak MiB added':>15} {'resident MiB added':>19} "
          f"{'seconds':>8}")
    for way, ranks in results.items():
        for rank, result in enumerate(ranks):
            print(f"{way:<8} {rank:>4} {result['parameters_held']:>16,} {result['peak_mib']:>15.0f} "
                  f"{result['resident_mib']:>19.0f} {result['seconds']:>8.2f}")
    for rank in range(args.world):
        sharded, whole = results["sharded"][rank], results["whole"][rank]
        print(f"rank {rank}: sharded / whole: peak {sharded['peak_mib'] / whole['peak_mib']:.2f}x, resident "
              f"{sharded['resident_mib'] / whole['resident_mib']:.2f}x, time {sharded['seconds'] / whole['seconds']:.2f}x")
    print(json.dumps(results))


def _bf16_copy(source: Path, target: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.bfloat16).save_pretrained(target)
    return str(target)


if __name__ == "__main__":
    main()
