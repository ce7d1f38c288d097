"""The host memory allocator of trainer processes on CPUs.

A CPU training step allocates and frees the same tensors at every step: activations of a few MB each and
[vocabulary x hidden] gradients (113 MB for SmolLM2-135M). glibc's malloc hands blocks above its mmap threshold
(32 MB at most) back to the kernel as soon as they are freed and trims the top of its heap, so the next step maps
the memory again and the kernel faults in and zeroes every 4 KB page of it: 100,000-300,000 page faults a step
for SmolLM2-135M on a 2-core CPU. TCMalloc keeps freed memory for the next allocation: with it that model trains
13% more tokens/s in 14% less peak memory (BENCHMARKS.md). So trainer processes on CPUs preload TCMalloc when the
node has it (Debian/Ubuntu: `apt install libtcmalloc-minimal4`; it is also what PyTorch's own CPU launcher
prefers), and otherwise tell glibc to keep what is freed (7% more tokens/s).

Only the environment a process starts with can choose its allocator, so the scheduler puts these variables into
the trainer workers' runtime environment, and each trainer reports the allocator it got (`in_use`) in
MODEL_INITIALIZED. The scheduler looks for TCMalloc on the head node; cluster.yaml installs it on every node, and
a node without it ignores the preload (the dynamic linker says so on the trainer's stderr) and runs the tuned
glibc. Trainers on GPUs are left as they are: their tensors live in PyTorch's caching GPU allocator.
"""
from __future__ import annotations

import ctypes.util
import functools
import os
from pathlib import Path

TCMALLOC = "libtcmalloc_minimal.so.4"
# gperftools prints a stack trace for every allocation above 1 GiB by default; a model's embedding can be one.
_QUIET_TCMALLOC = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}
# glibc: serve every block from its heap (a freed block is then reused, not unmapped), never give back the heap's
# top (what a step frees at its end, the next step takes again), and grow it 256 MiB at a time.
GLIBC_KEEPS_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 62),
                            "MALLOC_TOP_PAD_": str(256 << 20)}


@functools.lru_cache(maxsize=1)
def tcmalloc_installed() -> bool:
    """Whether the dynamic linker finds TCMalloc on this node (ldconfig's cache; nothing is loaded)."""
    return ctypes.util.find_library("tcmalloc_minimal") == TCMALLOC


def trainer_environment(on_gpus: bool, choice: str = "auto") -> dict[str, str]:
    """Environment variables that give a new trainer process the faster allocator; `choice` is settings.allocator
    ("system": none). An LD_PRELOAD the cluster already sets (an operator's own allocator, say) is kept."""
    if on_gpus or choice == "system":
        return {}
    environment = dict(GLIBC_KEEPS_FREED_MEMORY)
    if tcmalloc_installed() and "LD_PRELOAD" not in os.environ:
        environment.update({"LD_PRELOAD": TCMALLOC, **_QUIET_TCMALLOC})
    return environment


def in_use() -> str:
    """The allocator this process runs: "tcmalloc", "glibc, freed memory kept" or "system"."""
    try:
        if "libtcmalloc" in Path("/proc/self/maps").read_text():
            return "tcmalloc"
    except OSError:   # not Linux
        return "system"
    kept = all(os.environ.get(name) == value for name, value in GLIBC_KEEPS_FREED_MEMORY.items())
    return "glibc, freed memory kept" if kept else "system"
