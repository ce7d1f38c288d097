"""The allocator a CPU trainer process starts with: TCMalloc when installed, else glibc keeping freed memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ray_finetune.train import allocator

# A child that allocates, fills and frees a 64 MiB buffer six times, as a training step does with its larger
# tensors, and reports the page faults of the last five rounds and the allocator it runs.
ROUNDS = r"""
import json, resource, sys
from ray_finetune.train.allocator import in_use
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = bytearray(64 << 20)   # malloc + zero-filled: every page touched
    del buffer
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults[1:], "allocator": in_use()}))
"""
PAGES = (64 << 20) // 4096


def run_rounds(environment: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    output = subprocess.run([sys.executable, "-c", ROUNDS], env={**base, **environment}, capture_output=True,
                            text=True, check=True)
    return json.loads(output.stdout)


def test_glibc_as_it_starts_maps_a_freed_buffer_again_every_time():
    """What the setting is for: without it, each round faults in every page of the buffer again."""
    rounds = run_rounds({})
    assert rounds["allocator"] == "system"
    assert min(rounds["faults"]) > PAGES * 0.9


def test_glibc_told_to_keep_freed_memory_reuses_it():
    rounds = run_rounds(allocator.GLIBC_KEEPS_FREED_MEMORY)
    assert rounds["allocator"] == "glibc, freed memory kept"
    assert max(rounds["faults"]) < PAGES * 0.05


@pytest.mark.skipif(not allocator.tcmalloc_installed(),
                    reason=f"{allocator.TCMALLOC} not installed (Debian/Ubuntu: apt install libtcmalloc-minimal4; "
                           ".ci/run installs it)")
def test_a_cpu_trainer_environment_preloads_tcmalloc_when_the_node_has_it():
    environment = allocator.trainer_environment(on_gpus=False)
    assert environment["LD_PRELOAD"] == allocator.TCMALLOC
    rounds = run_rounds(environment)
    assert rounds["allocator"] == "tcmalloc"
    assert max(rounds["faults"]) < PAGES * 0.05


def test_which_trainers_get_which_environment(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(allocator, "tcmalloc_installed", lambda: False)
    assert allocator.trainer_environment(on_gpus=False) == allocator.GLIBC_KEEPS_FREED_MEMORY
    assert allocator.trainer_environment(on_gpus=True) == {}   # GPU tensors live in PyTorch's caching allocator
    assert allocator.trainer_environment(on_gpus=False, choice="system") == {}

    monkeypatch.setattr(allocator, "tcmalloc_installed", lambda: True)
    assert allocator.trainer_environment(on_gpus=False)["LD_PRELOAD"] == allocator.TCMALLOC
    monkeypatch.setenv("LD_PRELOAD", "/opt/operator/libjemalloc.so.2")   # the cluster's own choice stays
    assert "LD_PRELOAD" not in allocator.trainer_environment(on_gpus=False)


def test_the_allocator_setting_is_checked(monkeypatch):
    from ray_finetune import settings
    from ray_finetune.errors import ConfigError

    monkeypatch.setenv("RAY_FINETUNE_ALLOCATOR", "jemalloc")
    with pytest.raises(ConfigError, match="RAY_FINETUNE_ALLOCATOR='jemalloc' is not one of auto, system"):
        settings.load()
