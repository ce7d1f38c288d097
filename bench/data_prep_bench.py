"""Data preparation: ray_finetune's route (JSONL cut into byte-range shards, tokenized by Ray tasks on every CPU,
packed from memory-mapped shards into row files) against the usual peer route (`datasets` load_dataset("json") +
`.map` with the tokenizer's chat template on every CPU, then TRL's best-fit packing), on the same chat JSONL, in
one invocation. Prints tokens/s, peak memory above the idle baseline (RSS of the whole process tree, Ray's
workers included, less memory-mapped file pages; sampled every 20 ms), packed rows, and the ratios.

    python bench/data_prep_bench.py                  # ~32 MB of chitchat conversations, SmolLM2's tokenizer
    python bench/data_prep_bench.py --megabytes 512  # a bigger file: memory should stay flat for ours

The peer tokenizes each conversation once; ours renders the template per assistant turn as well, to find the
spans the loss is taken on (the peer learns from every token, prompts included). Needs `pip install trl`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 2048


def make_data(path: Path, megabytes: int) -> int:
    """chitchat conversations (MIT), whole, repeated until the file has the size asked for."""
    import chitchat_dataset

    records = []
    for _, conversation in sorted(chitchat_dataset.Dataset().items()):
        turns = []
        for group in conversation["messages"]:
            text = " ".join(m["text"].strip() for m in group if m["text"].strip())
            role = "user" if len(turns) % 2 == 0 else "assistant"
            if text:
                turns.append({"role": role, "content": text})
        if len(turns) % 2:
            turns.pop()
        if turns:
            records.append(json.dumps({"messages": turns}) + "\n")
    written = count = 0
    with path.open("w") as handle:
        while written < megabytes << 20:
            for line in records:
                handle.write(line)
                written += len(line)
                count += 1
    return count


class PeakMemory:
    """Peak private memory (RSS less file-backed shared pages) of this process and all its descendants, above
    what they held when started. Pages of memory-mapped files are left out: the kernel can drop them at will,
    and both routes map their data (datasets' Arrow files; our tokenized shards and row files)."""

    def __init__(self) -> None:
        import psutil

        self._root = psutil.Process()
        self.baseline = self.peak = self._total()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _total(self) -> int:
        total = 0
        for process in [self._root, *self._root.children(recursive=True)]:
            try:
                info = process.memory_info()
                total += info.rss - info.shared
            except Exception:  # noqa: BLE001 - a worker that exited between listing and reading
                pass
        return total

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self._total())
            time.sleep(0.02)

    def stop(self) -> dict:
        self._running = False
        self._thread.join()
        return {"peak_mb_above_idle": (self.peak - self.baseline) / 2**20, "idle_mb": self.baseline / 2**20}


def model_path() -> str:
    from ray_finetune.train.models import resolve_model

    return str(resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").path)


def route_ours(data: Path, work: Path) -> dict:
    import ray

    from ray_finetune.data.prepare import map_over_cluster
    from ray_finetune.data.prepare import prepare
    from ray_finetune.train.models import load_tokenizer

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    path = model_path()
    tokenizer = load_tokenizer(path)
    ray.get([ray.remote(lambda: None).remote() for _ in range(os.cpu_count())])   # workers up before timing
    memory = PeakMemory()
    started = time.perf_counter()
    prepared = prepare("train_data_path", str(data), task_type="CHAT_COMPLETION", model_path=path,
                       tokenizer=tokenizer, context_length=CONTEXT, cache_dir=work / "cache",
                       map_shards=map_over_cluster, parallelism=os.cpu_count())
    seconds = time.perf_counter() - started
    stats = prepared.stats
    return {"seconds": seconds, "tokens": stats["tokens"], "rows": stats["rows"],
            "packing_efficiency": stats["packing_efficiency"], **memory.stop()}


def route_peer(data: Path, work: Path) -> dict:
    import datasets
    from trl.data_utils import pack_dataset

    from ray_finetune.train.models import load_tokenizer

    datasets.disable_caching()
    tokenizer = load_tokenizer(model_path())
    memory = PeakMemory()
    started = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf"))

    def tokenize(batch: dict) -> dict:
        return {"input_ids": [tokenizer.apply_chat_template(m, tokenize=True, return_dict=False)
                              for m in batch["messages"]]}

    tokenized = dataset.map(tokenize, batched=True, num_proc=os.cpu_count(), remove_columns=["messages"])
    packed = pack_dataset(tokenized, seq_length=CONTEXT, strategy="bfd")
    tokens = int(sum(len(ids) for ids in packed["input_ids"]))
    seconds = time.perf_counter() - started
    rows = len(packed)
    return {"seconds": seconds, "tokens": tokens, "rows": rows,
            "packing_efficiency": round(tokens / (rows * CONTEXT), 4), **memory.stop()}


def run_route(route: str, data: Path) -> dict:
    """Each route in a fresh interpreter, so neither inherits the other's memory or warm caches."""
    output = subprocess.run([sys.executable, __file__, "--route", route, "--data", str(data)],
                            capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=32)
    parser.add_argument("--route", choices=["ours", "peer"])
    parser.add_argument("--data", type=Path)
    args = parser.parse_args()
    if args.route:
        sys.path.insert(0, str(ROOT))
        with tempfile.TemporaryDirectory() as work:
            result = (route_ours if args.route == "ours" else route_peer)(args.data, Path(work))
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "chat.jsonl"
        conversations = make_data(data, args.megabytes)
        print(f"{data.stat().st_size / 2**20:.0f} MB, {conversations} conversations, context {CONTEXT}, "
              f"{os.cpu_count()} CPUs")
        results = {route: run_route(route, data) for route in ("ours", "peer")}
    for route, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        print(f"{route:5s} {r['tokens_per_s']:10,.0f} tok/s  {r['seconds']:6.1f} s  {r['tokens']:,} tokens  "
              f"{r['rows']:,} rows ({r['packing_efficiency']:.1%} full)  peak +{r['peak_mb_above_idle']:,.0f} MB "
              f"(idle {r['idle_mb']:,.0f} MB)")
    ours, peer = results["ours"], results["peer"]
    print(f"ratio: {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x tokens/s, "
          f"{ours['peak_mb_above_idle'] / max(peer['peak_mb_above_idle'], 1):.2f}x peak memory")


if __name__ == "__main__":
    main()
