#!/usr/bin/env bash
# The whole GPU check in one device call: GPU tests, per-op benchmarks, end-to-end report.
# Run from the repo root on the GPU machine: `bash perf/gpu_check.sh`; results go under $OUT
# (perf/out by default): gpu_tests.log, ops_bench.json, ops_bench.log, gpu_report.{md,json,png},
# backfill_timing.{md,json}, engine.{md,json}.
# Record the numbers in perf/RESULTS.md with card, date and commit.
set -uo pipefail
OUT=${OUT:-perf/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c \
  "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/gpu_tests.log" 2>&1
python3 -m pytest tests/ops tests/test_triton_backend.py -q -p no:cacheprovider 2>&1 \
  | tee -a "$OUT/gpu_tests.log" || status=1
python3 -m pytest perf/ops --benchmark-only --benchmark-json="$OUT/ops_bench.json" \
  --benchmark-columns=median,iqr,rounds -q -p no:cacheprovider > "$OUT/ops_bench.log" 2>&1 \
  || status=1
python3 -m perf.gpu_report --out "$OUT" || status=1
python3 -m perf.backfill_timing --preset llama-2-7b --device cuda --dtype bfloat16 --out "$OUT" \
  || status=1
python3 -m perf.engine_bench --preset llama-2-7b --device cuda --dtype bfloat16 --requests 16 \
  --backends triton torch --min-free 1 8 --out "$OUT" || status=1
exit $status
