"""The GPU benchmark must run on a GPU machine that has torch, transformers, DeepSpeed and pydantic but none of the
service's other packages (Ray, MLflow, DuckDB, ...): a GPU session has minutes, not time to install a cluster.
Its `--tiny` mode runs the same code on CPU; here it runs with those packages made unimportable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "duckdb", "deltalake", "pyspark", "datasets", "gguf", "s3fs")


def test_the_gpu_benchmark_runs_without_ray_mlflow_or_duckdb(tmp_path):
    """What a GPU lease runs (--session: the comparison, then further contenders until a deadline), small."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT_ON_THE_GPU_MACHINE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
           "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--tiny", "--session",
                           "--deadline", "540"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    for name in ("ours", "hf_trainer_padded"):
        assert "error" not in result[name], result[name]["error"][-3000:]
        assert result[name]["useful_tokens_per_s"] > 0
    assert result["ours"]["packing_efficiency"] > 0.9
    assert result["scaling"][0]["useful_tokens_per_s"] > 0
    # the profiled contender says where its steps' time went, and leaves the whole table beside the results
    profiled = result["ours_profiled"]
    assert profiled["profiled_seconds"] > 0 and profiled["profile_top"][0][1] > 0
    assert "aten::" in (tmp_path / "profile.txt").read_text()
