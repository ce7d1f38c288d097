"""Checkpoint cost for SmolLM2-135M on this machine: ray_finetune's checkpoint (DeepSpeed engine state + HF
safetensors weights + atomic publish) against the plain-PyTorch peer (torch.save of model and optimizer state
dicts), in the same process: save time (= the pause training sees), load time, size on disk, and a training step
for scale.

    python bench/checkpoint_bench.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--context 512]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ray_finetune.data.formats import TokenizedExample  # noqa: E402
from ray_finetune.data.packing import pack_examples  # noqa: E402
from ray_finetune.spec import parse_duration  # noqa: E402
from ray_finetune.train import hardware, loop  # noqa: E402
from ray_finetune.train.distributed import join_process_group  # noqa: E402
from ray_finetune.train.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from ray_finetune.train.plan import make_plan  # noqa: E402
from ray_finetune.train.publishing import Publisher  # noqa: E402
from ray_finetune.train.step import CausalLMLoss, forward_loss, make_batch  # noqa: E402


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.is_dir() \
        else path.stat().st_size / 2**20


def engine_for(model_path: Path, plan, learning_rate: float = 1e-5):
    import deepspeed

    model = load_model(model_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=loop.BETAS, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=CausalLMLoss(model), optimizer=optimizer,
                                           config=hardware.deepspeed_config(plan, 0, hardware.FP32))
    return engine, optimizer


class Training:
    """A model trained in this process (a group of one) on random tokens, `context` per row, one row a step."""

    def __init__(self, model: str, context: int, steps: int) -> None:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        join_process_group(0, 1)
        self.model_path = resolve_model(model).path
        self.tokenizer = load_tokenizer(self.model_path)
        rng = np.random.default_rng(0)
        vocabulary = min(40000, len(self.tokenizer))
        examples = [TokenizedExample(rng.integers(10, vocabulary, context - 8).tolist(), [True] * (context - 8))
                    for _ in range(4)]
        self.rows, stats = pack_examples(examples, context, self.tokenizer.pad_token_id)
        self.plan = make_plan(rows=len(self.rows), tokens=stats.tokens, duration=parse_duration(f"{steps}ba"),
                              world_size=1, seed=0)
        self.engine, self.optimizer = engine_for(self.model_path, self.plan)
        self.steps_done = 0

    def train(self, steps: int) -> float:
        """Train `steps` optimizer steps; returns the seconds they took."""
        started = time.perf_counter()
        for _ in range(steps):
            for micro in self.plan.rank_micro_batches(self.steps_done, 0):
                result = forward_loss(self.engine, make_batch(self.rows, micro))
                self.engine.backward(result.loss_sum / max(result.target_tokens, 1), scale_wrt_gas=False)
                self.engine.step()
            self.steps_done += 1
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    training = Training(args.model, args.context, steps=4)
    model_path, tokenizer, plan, engine, optimizer = (training.model_path, training.tokenizer, training.plan,
                                                      training.engine, training.optimizer)
    step_s = training.train(2) / 2   # optimizer state exists only after a step

    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as folder:   # two checkpoints of the model
        work = Path(folder)
        config = loop.TrainConfig(run_name="bench", model_path=str(model_path), init_weights_path=None,
                                  train_rows_path="", plan=plan, learning_rate=1e-5, save_folder=str(work), rank=0,
                                  world_size=1, seed=0)
        publisher = Publisher(config.save_folder, config.run_name, rank=0, keep=3, report=lambda _: None)
        started = time.perf_counter()
        ours = loop.save_checkpoint(engine, tokenizer, config, publisher, epoch=0, step=2)
        ours_save_s = time.perf_counter() - started
        fresh, _ = engine_for(model_path, plan)
        started = time.perf_counter()
        loop.resume(fresh, ours)
        ours_load_s = time.perf_counter() - started

        peer_file = work / "peer.pt"
        started = time.perf_counter()
        torch.save({"model": engine.module.state_dict(), "optimizer": optimizer.state_dict()}, peer_file)
        peer_save_s = time.perf_counter() - started
        started = time.perf_counter()
        state = torch.load(peer_file, map_location="cpu", weights_only=True)
        engine.module.load_state_dict(state["model"])
        peer_load_s = time.perf_counter() - started

        result = {
            "model": args.model, "parameters": sum(p.numel() for p in engine.module.parameters()),
            "train_step_s": round(step_s, 2),
            "ours": {"save_s": round(ours_save_s, 2), "load_s": round(ours_load_s, 2),
                     "size_mb": round(size_mb(ours), 1), "weights_mb": round(size_mb(ours / "model"), 1)},
            "peer_torch_save": {"save_s": round(peer_save_s, 2), "load_s": round(peer_load_s, 2),
                                "size_mb": round(size_mb(peer_file), 1)},
        }
        result["ratio_save_ours_over_peer"] = round(ours_save_s / peer_save_s, 2)
        result["pause_in_steps"] = round(ours_save_s / step_s, 2)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
