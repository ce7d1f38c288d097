#!/usr/bin/env bash
# Run here (where pip reaches the registries) before a GPU session: writes into .whl/ (ignored by git) the wheels
# bench/gpu_session.sh installs on the GPU machine, whose image has torch and CUDA but not these, at the versions
# constraints.txt pins (the ones the tests pass with). DeepSpeed ships only a source archive; its wheel is built
# here (pure Python: its ops are compiled where they run) in pip's isolated build environment, which brings the
# setuptools and wheel it needs (a bare python3 has no `wheel`). About 18 MB, carried with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i -E "^$1==" constraints.txt; }
mkdir -p .whl && rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
    "$(pin typing_extensions)" "$(pin hjson)" "$(pin transformers)" \
    "$(pin trl)" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)"   # the TRL peer (gpu_bench.py --trl)
python3 -m pip wheel -q --no-deps -w .whl "$(pin deepspeed)"
ls -1 .whl
