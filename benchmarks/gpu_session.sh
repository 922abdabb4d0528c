#!/usr/bin/env bash
# Every GPU check of the memory-layer kernels and the training step, as ONE script for a lent GPU
# machine (../shared/gpu/README.md: carry .whl, and .xlm for XLM's layer). Results accumulate in a
# work folder and are re-packed into $OUT/gpu_results.tgz after each stage, so a run cut short still
# returns what it did. Stages, most important first:
#   1. benchmarks/gpu_kernels.sh: kernel tests on CUDA, launch sweep, layer benchmark vs XLM and FFN
#   2. training step, BERT-large: plain HF vs ours vs ours + PKM, micro-batches 64 and 256
#   3. A/B of the one-GPU DeepSpeed config: our rows with its ZeRO-2 form (contiguous gradients,
#      per-parameter hooks), as the config was before
#   4. the same as 2 at micro-batch 256 with the encoder layers torch.compile'd (train.compile)
#   5. the same as 2 for BERT-base (with the host-sync report)
#   6. torch.profiler of BERT-large + PKM at micro-batch 256
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
WORK=$(mktemp -d)
pack() { tar czf "$OUT/gpu_results.tgz" -C "$WORK" . ; }
S=$(mktemp -d)
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" .whl/*.whl \
    && export PYTHONPATH=$S:$PWD PATH=$S/bin:$PATH PKM_SKIP_TORCH=1
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=$WORK/kernels bash benchmarks/gpu_kernels.sh; pack

T=$WORK/train; mkdir -p "$T"
python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" > "$T/versions.txt" 2>&1
BENCH=(benchmarks/train_step.py --gpu --gpu-micro 64,256 --seq 128 --steps 8 --warmup 3
       --ds-config ds_configs/h200_bert_large_bf16.json)
timeout -k 10 150 python3 "${BENCH[@]}" --models large --json "$T/large.json" > "$T/large.log" 2>&1
echo "large: exit $?"; tail -n 14 "$T/large.log"; pack
python3 -c "import json; d = json.load(open('ds_configs/h200_bert_large_bf16.json')); \
d['zero_optimization'].update(stage=2, contiguous_gradients=True); json.dump(d, open('$T/zero2_form.json', 'w'))"
timeout -k 10 120 python3 "${BENCH[@]}" --models large --rows ours,ours_pkm --ds-config "$T/zero2_form.json" \
  --json "$T/large_zero2_form.json" > "$T/large_zero2_form.log" 2>&1
echo "large, ZeRO-2 form: exit $?"; tail -n 8 "$T/large_zero2_form.log"; pack
timeout -k 10 240 python3 "${BENCH[@]}" --models large --gpu-micro 256 --warmup 5 --compile \
  --json "$T/large_compiled.json" > "$T/large_compiled.log" 2>&1
echo "large, compiled: exit $?"; tail -n 8 "$T/large_compiled.log"; pack
timeout -k 10 100 python3 "${BENCH[@]}" --models base --check-syncs --json "$T/base.json" > "$T/base.log" 2>&1
echo "base: exit $?"; tail -n 14 "$T/base.log"; pack
timeout -k 10 70 python3 benchmarks/train_step.py --gpu --models large --rows ours_pkm --gpu-micro 256 --steps 2 \
  --warmup 2 --ds-config ds_configs/h200_bert_large_bf16.json --profile "$T/profile" --json "$T/profile.json" \
  > "$T/profile.log" 2>&1
echo "profile: exit $?"; pack
