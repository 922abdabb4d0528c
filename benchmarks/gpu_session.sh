#!/usr/bin/env bash
# Every GPU check of the memory-layer kernels and the training step, as ONE script for a lent GPU
# machine (../shared/gpu/README.md: carry .whl and .xlm). Results accumulate in a work folder and are
# re-packed into $OUT/gpu_results.tgz after each stage, so a run cut short still returns what it did.
#   stage 1: benchmarks/gpu_kernels.sh   (kernel tests on CUDA, layer benchmark, kernel launch sweep)
#   stage 2: benchmarks/gpu_train_step.sh (plain HF vs ours vs ours + PKM, BERT-base/large, profile)
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
WORK=$(mktemp -d)
pack() { tar czf "$OUT/gpu_results.tgz" -C "$WORK" . ; }
S=$(mktemp -d)
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" .whl/*.whl \
    && export PYTHONPATH=$S:$PWD PATH=$S/bin:$PATH PKM_SKIP_TORCH=1
fi
OUT=$WORK/kernels bash benchmarks/gpu_kernels.sh; pack
OUT=$WORK/train PYTHON=python3 bash benchmarks/gpu_train_step.sh; pack
