#!/usr/bin/env bash
# The CUDA checks and benchmarks behind docs/benchmarks.md's GPU tables, in one run on an H100 / H200. PARTS
# picks what runs (default: all but compile, about 4 minutes):
#   tests    tests/test_cuda.py
#   compare  `dynamixer bench` bf16, fast vs reference: inference batch 128, training batch 64 and 256
#   triton   the same without the Triton mixing kernels (--no-triton)
#   profile  torch.profiler tables of one bf16 inference and training step
#   compile  the compile target: the fast model alone, compiled and eager, bf16 batch 128 (slow to compile)
# Run from the repository root:
#     OUT=gpu-results PARTS="tests compile" bash benchmarks/gpu.sh
set -u
OUT=${OUT:-gpu-results}
PARTS=" ${PARTS:-tests compare triton profile} "
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
has() { [[ "$PARTS" == *" $1 "* ]]; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
  if has tests; then timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15; fi
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
if has compare; then
  bench bf16 100 --precision bf16 --batch-size 128 --train-batch-size 64 --warmup 5 --iters 20
  bench bf16_train256 100 --precision bf16 --modes train --train-batch-size 256 --warmup 3 --iters 10
fi
if has triton; then
  bench bf16_no_triton 120 --precision bf16 --batch-size 128 --train-batch-size 256 --warmup 3 --iters 10 \
    --no-triton --no-memory
fi
if has profile; then
  profile inference 128
  profile train 64
  grep '^###\|Self CUDA time total' "$OUT/profile.txt"
fi
if has compile; then
  for mode in inference train; do
    bench "bf16_${mode}_eager_fast" 60 --precision bf16 --modes $mode --batch-size 128 --no-reference --no-memory \
      --warmup 5 --iters 20
    bench "bf16_${mode}_compiled_fast" 240 --precision bf16 --modes $mode --batch-size 128 --no-reference \
      --no-memory --warmup 3 --iters 10 --compile
  done
fi
grep -v '^\[bench\]' "$OUT/log.txt" 2>/dev/null | tail -5
