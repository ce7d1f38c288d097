"""The dry run on a large chat file: fm.estimate() tokenizing in its own process (no cluster up; what every dry run
did before) against the same call with a local Ray head up, when it tokenizes across the cluster as the run's data
packer does. Same file, same tokenizer, empty cache each time, in one invocation; each route in a fresh process.

    python bench/estimate_bench.py                   # 48 MB of chitchat conversations, SmolLM2, context 2048
    python bench/estimate_bench.py --megabytes 256

Validation (every line checked before anything else) runs in the driver in both routes; the probe is off (it
times the model, not the data)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

ROUTE = """
import json, sys, time
from ray_finetune import foundation_model as fm
started = time.perf_counter()
result = fm.estimate(model=sys.argv[1], train_data_path=sys.argv[2], context_length=2048, probe=False)
print(json.dumps({"seconds": time.perf_counter() - started, "tokens": result.tokens, "rows": result.rows,
                  "tokenized": result.tokenized}))
"""


def run_route(home: Path, data: Path) -> dict:
    shutil.rmtree(home / "storage" / "packed", ignore_errors=True)   # the cache would answer at once
    env = {**os.environ, "RAY_FINETUNE_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", ROUTE, MODEL, str(data)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=48)
    args = parser.parse_args()
    from data_prep_bench import make_data

    with tempfile.TemporaryDirectory() as folder:
        home, data = Path(folder) / "home", Path(folder) / "chat.jsonl"
        conversations = make_data(data, args.megabytes)
        env = {**os.environ, "RAY_FINETUNE_HOME": str(home)}
        # The one-time GGUF conversion, outside both timings.
        subprocess.run([sys.executable, "-c", f"from ray_finetune.train.models import resolve_model; "
                        f"resolve_model({MODEL!r})"], env=env, check=True, capture_output=True)
        alone = run_route(home, data)
        subprocess.run([sys.executable, "-c", "from ray_finetune import cluster; cluster.connect()"], env=env,
                       check=True, capture_output=True)   # a local head, as the first create() starts it
        try:
            spread = run_route(home, data)
        finally:
            subprocess.run([sys.executable, "-m", "ray_finetune.cli", "down"], env=env, capture_output=True)
    assert (alone["tokens"], alone["rows"]) == (spread["tokens"], spread["rows"])
    print(f"{args.megabytes} MB, {conversations:,} conversations, {alone['tokens']:,} tokens, "
          f"{alone['rows']:,} rows, {os.cpu_count()} CPUs")
    for name, route in (("no cluster up", alone), ("local head up", spread)):
        print(f"  {name:15s} {route['seconds']:7.1f} s  {route['tokens'] / route['seconds']:10,.0f} tok/s  "
              f"tokenized {route['tokenized']}")
    print(f"  speed-up with the cluster: {alone['seconds'] / spread['seconds']:.2f}x")


if __name__ == "__main__":
    main()
