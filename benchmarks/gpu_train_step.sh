#!/usr/bin/env bash
# Issue 12's GPU measurement on one H200 (or H100): plain HF BertForMaskedLM vs ours memory-less vs
# ours + one ResM memory (N = 512^2, H = 4, k = 32), seq 128, bf16, micro-batches 64 and 256.
#
#   OUT=/some/folder bash benchmarks/gpu_train_step.sh          # about 4 minutes, every step under `timeout`
#   EXTRA=1 OUT=... bash benchmarks/gpu_train_step.sh           # + A/B runs (about 4 more minutes)
#
# Writes to $OUT: gpu.csv + versions.txt (GPU, driver, torch/CUDA/deepspeed/transformers), base.json/.log,
# large.json/.log (the tables), profile/*.txt (torch.profiler key_averages of BERT-large + PKM at micro
# 256, sorted by device time), and with EXTRA=1 large_zero2_default.json (the engine config of the
# original measurement: ZeRO-2 with overlap_comm) and large_compile.json (torch.compile of the layers).
# A step that fails or times out does not stop the next one; see its .log.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
BENCH=(benchmarks/train_step.py --gpu --gpu-micro 64,256 --seq 128 --steps 10 --warmup 3
       --ds-config ds_configs/h200_bert_large_bf16.json)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.csv" 2>&1
timeout 60 "$PY" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" \
  > "$OUT/versions.txt" 2>&1

# 1. BERT-base, with the host-sync report of one step per row (~1 min)
timeout -k 10 110 "$PY" "${BENCH[@]}" --models base --check-syncs --json "$OUT/base.json" > "$OUT/base.log" 2>&1
echo "base: exit $?"; tail -n 12 "$OUT/base.log"

# 2. BERT-large (~2 min)
timeout -k 10 160 "$PY" "${BENCH[@]}" --models large --json "$OUT/large.json" > "$OUT/large.log" 2>&1
echo "large: exit $?"; tail -n 12 "$OUT/large.log"

# 3. profile: BERT-large + PKM, micro 256, 3 steps (~45 s)
timeout -k 10 90 "$PY" benchmarks/train_step.py --gpu --models large --rows ours_pkm --gpu-micro 256 --steps 2 \
  --warmup 2 --ds-config ds_configs/h200_bert_large_bf16.json --profile "$OUT/profile" \
  --json "$OUT/profile.json" > "$OUT/profile.log" 2>&1
echo "profile: exit $?"; ls "$OUT/profile" 2>/dev/null

if [ "${EXTRA:-0}" = 1 ]; then
  # 4. A/B: the engine config of the original measurement (ZeRO-2, overlap_comm on), ours rows only
  timeout -k 10 120 "$PY" benchmarks/train_step.py --gpu --models large --rows ours,ours_pkm --gpu-micro 64,256 \
    --steps 10 --warmup 3 --json "$OUT/large_zero2_default.json" > "$OUT/large_zero2_default.log" 2>&1
  echo "large, original ZeRO-2 config: exit $?"; tail -n 8 "$OUT/large_zero2_default.log"
  # 5. torch.compile of the encoder layers (memory layers stay eager); compilation takes the warm-up
  timeout -k 10 240 "$PY" "${BENCH[@]}" --models large --gpu-micro 256 --warmup 5 --compile \
    --json "$OUT/large_compile.json" > "$OUT/large_compile.log" 2>&1
  echo "large, compiled: exit $?"; tail -n 8 "$OUT/large_compile.log"
fi
