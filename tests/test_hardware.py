"""What a trainer chooses from its device and settings: precision, attention, ZeRO stage, DeepSpeed config; and
settings that are not understood are refused with the variable, the value and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_finetune import settings
from ray_finetune.errors import ConfigError
from ray_finetune.spec import Duration
from ray_finetune.train.attention import DOCUMENT_SDPA
from ray_finetune.train.hardware import (BF16, FP32, choose_attention, choose_precision, deepspeed_config,
                                         zero_stage)
from ray_finetune.train.plan import make_plan

CPU = torch.device("cpu")


def test_cpu_defaults_are_exact_fp32_sdpa_zero0():
    assert choose_precision(CPU) == FP32
    assert choose_attention(CPU) == DOCUMENT_SDPA             # whole rows, SDPA run per document
    assert DOCUMENT_SDPA in settings.ATTENTIONS               # RAY_FINETUNE_ATTENTION can name it
    assert zero_stage(CPU, FP32) == 0


def test_cpu_bf16_uses_the_optimizer_with_fp32_masters_and_fp32_accumulation():
    assert choose_precision(CPU, "bf16") == BF16
    assert zero_stage(CPU, BF16) == 1
    plan = make_plan(rows=40, tokens=4000, duration=Duration(value=1, unit="ep"), world_size=1, seed=0)
    config = deepspeed_config(plan, 1, BF16)
    assert config["bf16"] == {"enabled": True}
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert config["zero_optimization"] == {"stage": 1}


ENGINE_STEP = """
import torch
from ray_finetune.train.distributed import join_process_group
join_process_group(0, 1)
import deepspeed
from ray_finetune.spec import Duration
import math
from ray_finetune.train.hardware import deepspeed_config, engine_reports_gradient_norm
from ray_finetune.train.plan import make_plan
plan = make_plan(rows=40, tokens=4000, duration=Duration(value=1, unit="ep"), world_size=1, seed=0)
for stage in (0, 1, 2):
    for precision in ("bf16", "fp32"):
        model = torch.nn.Linear(8, 8)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                          config=deepspeed_config(plan, stage, precision))
        for _ in range(plan.gradient_accumulation_steps):   # one whole optimizer step
            inputs = torch.randn(2, 8, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
            engine.backward(engine(inputs).float().sum())
            engine.step()
        # where the engine is said to keep the norm it clipped by, the training loop reads it after every step
        norm = engine.get_global_grad_norm()
        assert not engine_reports_gradient_norm(stage, precision) or math.isfinite(float(norm)), (stage, precision)
        print("stepped", stage, precision, flush=True)
"""


def test_every_stage_and_precision_the_settings_allow_builds_and_steps_a_deepspeed_engine():
    """E.g. DeepSpeed refuses fp32 gradient accumulation without ZeRO: a bf16 run at RAY_FINETUNE_ZERO_STAGE=0
    must not ask for it. (Its own process: DeepSpeed and the process group stay out of the test runner.)"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", ENGINE_STEP], capture_output=True, text=True, timeout=300)
    assert result.stdout.count("stepped") == 6, result.stderr[-3000:]


START_DEEPSPEED = """
from ray_finetune.train.distributed import join_process_group
join_process_group(0, 1)
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
print("started", flush=True)
"""


def test_deepspeed_starts_where_no_ninja_or_no_compiler_is_on_path(tmp_path):
    """A venv used without activating it (`.venv/bin/ray-finetune ...`, a Ray worker started from such a shell)
    has the pip package's ninja, which DeepSpeed needs to compile its CPU op, off PATH: the trainer finds it
    anyway. A machine with no C++ compiler (a slim container) cannot build the op: the trainer starts without it."""
    import os
    import shutil
    import subprocess
    import sys

    compiler_only = tmp_path / "bin"
    compiler_only.mkdir()
    for tool in ("c++", "g++", "gcc", "cc", "as", "ld"):
        if shutil.which(tool):
            (compiler_only / tool).symlink_to(shutil.which(tool))
    nothing = tmp_path / "empty"
    nothing.mkdir()
    for path, extensions in ((compiler_only, None), (nothing, tmp_path / "fresh-build-folder")):
        assert shutil.which("ninja", path=str(path)) is None
        env = {**os.environ, "PATH": str(path)}
        if extensions:
            env["TORCH_EXTENSIONS_DIR"] = str(extensions)   # nothing built there: it would have to compile
        result = subprocess.run([sys.executable, "-c", START_DEEPSPEED], capture_output=True, text=True, timeout=300,
                                env=env)
        assert "started" in result.stdout, result.stderr[-3000:]


def test_explicit_choices_win():
    assert choose_attention(CPU, "eager") == "eager"
    assert zero_stage(CPU, FP32, "2") == 2


def test_gpu_attention_prefers_flash_then_flex(monkeypatch):
    gpu = torch.device("cuda")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert choose_attention(gpu) == "flex_attention"
    assert choose_attention(gpu, stage=3) == "sdpa"     # nothing can be tried before ZeRO-3 shards the model
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert choose_attention(gpu) == "flash_attention_2"


def test_gpu_zero_stage_follows_the_model_and_the_gpus(monkeypatch):
    from types import SimpleNamespace

    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 << 30))
    assert zero_stage(gpu, BF16, parameters=1_240_000_000, world=1) == 2      # Llama-3.2-1B
    assert zero_stage(gpu, BF16, parameters=8_000_000_000, world=8) == 2      # 48 GB of model state on 80
    assert zero_stage(gpu, BF16, parameters=30_000_000_000, world=8) == 3     # 180 GB: the weights are sharded too
    assert zero_stage(gpu, BF16, parameters=3_000_000_000, world=1) == 2      # 56 GiB, nothing to shard over
    assert zero_stage(gpu, BF16, "2", parameters=30_000_000_000, world=8) == 2
    # fp32 (GPUs without bf16): 4-byte weights and gradients whole under ZeRO-2 make 8B need ZeRO-3 on 8 GPUs
    assert zero_stage(gpu, FP32, parameters=8_000_000_000, world=8) == 3
    with pytest.raises(torch.OutOfMemoryError, match=r"fp32 weights and gradients, Adam moments: 447 GiB"):
        zero_stage(gpu, FP32, parameters=30_000_000_000, world=1)
    # 1.3 TB of training state: 163 GiB per GPU even sharded 8 ways; it takes 18 GPUs of 80 GB
    with pytest.raises(torch.OutOfMemoryError, match=r"163.0 GiB per GPU under ZeRO-3 on 8 .* at least 18 such GPUs"):
        zero_stage(gpu, BF16, parameters=70_000_000_000, world=8)
    with pytest.raises(torch.OutOfMemoryError, match=r"under ZeRO-2 on 1 GPU.* at least 8 such GPUs"):
        zero_stage(gpu, BF16, parameters=30_000_000_000, world=1)


@pytest.mark.parametrize("variable,value", [("RAY_FINETUNE_PRECISION", "fp16"), ("RAY_FINETUNE_ATTENTION", "flash"),
                                            ("RAY_FINETUNE_ZERO_STAGE", "4"), ("RAY_FINETUNE_COMPILE", "yes"),
                                            ("RAY_FINETUNE_ACTIVATION_CHECKPOINTING", "sometimes")])
def test_unknown_settings_are_refused_naming_what_is_allowed(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"{variable}='{value}' is not one of"):
        settings.load()


@pytest.mark.parametrize("variable,value", [("RAY_FINETUNE_TRAINER_WORKERS", "two"),
                                            ("RAY_FINETUNE_MAX_CONCURRENT_RUNS", "0")])
def test_counts_that_are_not_counts_are_refused(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"{variable}='{value}' is not a whole number"):
        settings.load()


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_a_memory_limit_that_is_not_an_amount_is_refused(monkeypatch, value):
    monkeypatch.setenv("RAY_FINETUNE_CPU_MEMORY_GB", value)
    with pytest.raises(ConfigError, match=f"RAY_FINETUNE_CPU_MEMORY_GB='{value}' is not a number of GiB"):
        settings.load()


def test_storage_is_a_folder_or_an_object_store_url_mirrored_under_the_home(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_FINETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_FINETUNE_STORAGE", "s3://team-bucket/ray_finetune/")
    loaded = settings.load()
    assert loaded.storage == tmp_path / "home" / "mirror" / "s3" / "team-bucket" / "ray_finetune"
    assert loaded.storage_location == "s3://team-bucket/ray_finetune"
    assert loaded.as_env()["RAY_FINETUNE_STORAGE"] == "s3://team-bucket/ray_finetune"   # what other nodes map
    monkeypatch.setenv("RAY_FINETUNE_STORAGE", "nosuchstore://bucket/x")
    with pytest.raises(ConfigError, match="no installed fsspec implementation handles nosuchstore://"):
        settings.load()
    monkeypatch.setenv("RAY_FINETUNE_STORAGE", f"file://{tmp_path}/shared")
    assert settings.load().storage == tmp_path / "shared"
    assert settings.load().storage_location == str(tmp_path / "shared")
    monkeypatch.setenv("RAY_FINETUNE_STORAGE", "~/shared")
    assert settings.load().storage == Path.home() / "shared"


def test_settings_travel_to_the_actors(monkeypatch):
    monkeypatch.setenv("RAY_FINETUNE_PRECISION", "BF16")
    monkeypatch.setenv("RAY_FINETUNE_ZERO_STAGE", "2")
    monkeypatch.setenv("RAY_FINETUNE_CPU_MEMORY_GB", "12.5")
    loaded = settings.load()
    assert (loaded.precision, loaded.zero_stage, loaded.cpu_memory_gb) == ("bf16", "2", 12.5)
    environment = loaded.as_env()
    assert environment["RAY_FINETUNE_PRECISION"] == "bf16" and environment["RAY_FINETUNE_ZERO_STAGE"] == "2"
    assert environment["RAY_FINETUNE_CPU_MEMORY_GB"] == "12.5"


def test_a_containers_memory_limit_is_what_a_trainer_has(tmp_path):
    """In a Kubernetes pod the kernel kills at the pod's memory limit, whatever the host has free."""
    import psutil

    from ray_finetune.train.hardware import host_memory

    host = psutil.virtual_memory()
    assert host_memory(tmp_path / "none")[0] == host.total             # no cgroup files: the host's figures
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{8 << 30}\n")
    (v2 / "memory.current").write_text(f"{3 << 30}\n")
    (v2 / "memory.stat").write_text(f"anon {2 << 30}\ninactive_file {1 << 30}\n")
    assert host_memory(v2) == (8 << 30, min(host.available, 6 << 30))   # 3 GiB used, 1 of it reclaimable cache
    (v2 / "memory.max").write_text("max\n")                               # no limit: the host's figures
    assert host_memory(v2)[0] == host.total
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{4 << 30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 << 30}\n")
    (v1 / "memory.stat").write_text("total_inactive_file 0\n")
    assert host_memory(tmp_path / "v1") == (4 << 30, min(host.available, 3 << 30))


def test_a_trainer_leaves_what_rays_memory_monitor_keeps_free(monkeypatch):
    from ray_finetune.train import loop

    monkeypatch.setattr(loop, "host_memory", lambda: (100 << 30, 40 << 30))
    budget, source = loop.cpu_memory_budget(0)
    assert budget == pytest.approx(35 << 30) and "35.0 GiB available" in source and "RAY_memory_usage_threshold=0.95" in source
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.8")
    assert loop.cpu_memory_budget(0)[0] == pytest.approx(20 << 30)
    monkeypatch.setenv("RAY_memory_usage_threshold", "most")           # not a number: Ray's default, no traceback
    assert loop.cpu_memory_budget(0)[0] == pytest.approx(35 << 30)
    assert loop.cpu_memory_budget(2.5) == (2.5 * 2**30, "RAY_FINETUNE_CPU_MEMORY_GB=2.5")


ALLOCATOR_SETTING = """
import os
from ray_finetune.train.distributed import join_process_group
join_process_group(0, 1)
print("allocator:", os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), os.environ.get("PYTORCH_ALLOC_CONF"))
"""


def test_a_trainer_process_lets_the_gpu_allocator_expand_unless_the_operator_chose(tmp_path):
    """The micro-batch search's failed trials fragment the default allocator (on an H200, 26% fewer tokens/s
    after them: BENCHMARKS.md); a trainer process asks for expandable segments, but keeps an operator's own setting."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    for extra, expected in (({}, "allocator: expandable_segments:True None"),
                            ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, "allocator: max_split_size_mb:512 None"),
                            ({"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.8"},
                             "allocator: None garbage_collection_threshold:0.8")):
        result = subprocess.run([sys.executable, "-c", ALLOCATOR_SETTING], capture_output=True, text=True,
                                timeout=300, env={**base, **extra})
        assert expected in result.stdout, result.stderr[-3000:]
