#!/usr/bin/env bash
# The CUDA checks and benchmarks behind docs/benchmarks.md's GPU tables, in one run (about 4 minutes on an
# H100 / H200): the CUDA tests, `dynamixer bench` in bf16 (inference batch 128, training batch 64 and 256; and
# without the Triton mixing kernels) and torch.profiler tables of one bf16 inference and training step.
# COMPILE=1 adds the compile target: the fast model alone, compiled and eager, bf16 (slow to compile).
# QUICK=1 skips the no-Triton comparison and the profiles. Run from the repository root:
#     OUT=gpu-results bash benchmarks/gpu.sh
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
  timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15
} 2>&1 | tee "$OUT/env_tests.txt"
bench() {  # name, timeout, bench arguments
  local name=$1 limit=$2; shift 2
  echo "## $name" | tee -a "$OUT/tables.md"
  timeout "$limit" python3 -m dynamixer.bench --device cuda --output "$OUT/$name.json" "$@" \
    2>>"$OUT/log.txt" | tee -a "$OUT/tables.md"
}
profile() {  # mode, batch
  timeout 80 python3 benchmarks/profile_step.py --device cuda --precision bf16 --mode "$1" --batch-size "$2" \
    >>"$OUT/profile.txt" 2>>"$OUT/log.txt"
}
bench bf16 100 --precision bf16 --batch-size 128 --train-batch-size 64 --warmup 5 --iters 20
bench bf16_train256 100 --precision bf16 --modes train --train-batch-size 256 --warmup 3 --iters 10
if [ "${QUICK:-0}" != 1 ]; then
bench bf16_no_triton 120 --precision bf16 --batch-size 128 --train-batch-size 256 --warmup 3 --iters 10 --no-triton \
  --no-memory
profile inference 128
profile train 64
fi
if [ "${COMPILE:-0}" = 1 ]; then
  for mode in inference train; do
    bench "bf16_${mode}_eager_fast" 60 --precision bf16 --modes $mode --batch-size 128 --no-reference --no-memory \
      --warmup 5 --iters 20
    bench "bf16_${mode}_compiled_fast" 240 --precision bf16 --modes $mode --batch-size 128 --no-reference \
      --no-memory --warmup 3 --iters 20 --compile
  done
fi
grep -v '^\[bench\]' "$OUT/log.txt" | tail -5
grep '^###\|Self CUDA time total' "$OUT/profile.txt"
