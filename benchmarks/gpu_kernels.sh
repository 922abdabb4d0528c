#!/usr/bin/env bash
# The GPU checks of the memory-layer kernels, as one script for a lent GPU machine (see
# ../shared/gpu/README.md): the gpu-marked kernel tests at realistic shapes, the interpreter tests on
# CUDA tensors, and the layer benchmark (with XLM's HashingMemory when .xlm/ holds its source).
# Logs and JSON go to ${OUT:-gpu_out}.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -x tests/test_triton_gpu.py tests/test_triton_kernels.py 2>&1 | tee "$OUT/kernel_tests.log" | tail -15
xlm=(); [[ -d .xlm/xlm ]] && xlm=(--xlm-src .xlm)
timeout 300 python3 benchmarks/pkm_layer.py --device cuda "${xlm[@]}" --json "$OUT/pkm_layer.json" \
  --profile-out "$OUT/pkm_layer_profile.txt" 2>&1 | grep -v "FAISS\|batch normalization" | tee "$OUT/pkm_layer.log"
