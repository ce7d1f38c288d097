#!/usr/bin/env bash
# What a GPU session runs on the device machine, in one call each (bench/gpu_wheels.sh first, here; carry .whl):
#   bash bench/gpu_session.sh session   # everything one lease allows (9 min): the comparison below, then scaling
#                                       # rows and variants by priority, each saved to $OUT as soon as measured
#   bash bench/gpu_session.sh main      # ours vs the HF Trainer, Llama-1B shape, context 2048 (~4-5 min)
#   bash bench/gpu_session.sh more      # ours with SDPA / compiled layers, then the scaling table (~6-8 min)
#   bash bench/gpu_session.sh tiny      # rehearsal: the same steps with a small model, on any machine
# Results come back as $OUT/gpu_bench.json, $OUT/gpu_bench_scaling.json and the logs; numbers go into BENCHMARKS.md.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: run bash bench/gpu_wheels.sh on the development machine and carry .whl"; exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 OUT
# The carried transformers is the one the tests pass with; should the image's own packages not take it, use the
# image's transformers rather than lose the session.
if ! python3 -c "import transformers, deepspeed, pydantic; from transformers import Trainer" 2>"$OUT/import.log"; then
    echo "carried transformers does not import here (see import.log); using the image's"; rm -rf /tmp/site/transformers*
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'deepspeed', deepspeed.__version__)"
case "${1:-main}" in
    session) timeout 560 python3 bench/gpu_bench.py --session --deadline 530 2>&1 | tee "$OUT/session.log" ;;
    main) timeout 540 python3 bench/gpu_bench.py 2>&1 | tee "$OUT/main.log" ;;
    more) timeout 270 python3 bench/gpu_bench.py --variants sdpa,compiled 2>&1 | tee "$OUT/variants.log"
          mv "$OUT/gpu_bench.json" "$OUT/gpu_bench_variants.json" 2>/dev/null
          timeout 270 python3 bench/gpu_bench.py --scaling 2>&1 | tee "$OUT/scaling.log" ;;
    tiny) python3 bench/gpu_bench.py --tiny 2>&1 | tee "$OUT/tiny.log" ;;    # a rehearsal, on any machine
    *) echo "usage: bench/gpu_session.sh session|main|more|tiny"; exit 2 ;;
esac
