#!/usr/bin/env bash
# The whole GPU check in one device call, at most 8.5 minutes (CHECK_SECONDS) from a cold machine:
#
#     bash perf/gpu_check.sh        # repo root, on the GPU machine; results under $OUT (perf/out)
#
# Stages, in this order, each with a budget in seconds. A stage must end by its deadline (the
# setup reserve plus its budget and every earlier one's), so time a stage leaves unused goes to
# the next and no overrun pushes the check past CHECK_SECONDS. It runs under `timeout -s INT`:
# pytest and perf.gpu_report stop cleanly on SIGINT and keep what finished (pytest-benchmark
# still writes its JSON; the autotune winners are still written at exit; the report writes the
# rows it measured; backfill_timing and engine_bench write only at their end); KILL GRACE s
# later. Expected times (estimates: no stage has yet been timed on a GPU with the quantized
# kernels; cold compile caches, no shipped autotune winners):
#   tests     GPU correctness, bf16 included: tests/ops and tests/test_triton_backend.py (and
#             the tuned-config loader on this Triton), on pytest-xdist workers,
#             D3KERNELS_AUTOTUNE=0 (shipped winners, else the first config: the stage is
#             compile-bound, and every config has tests of its own). ~140 s and more: what
#             has not run by the deadline is cut.
#   ops-warm  every per-op benchmark once, untimed, on xdist workers: the torch.compile graphs and
#             the autotune candidates (bf16, int4 and int8 weights) compile in parallel into the
#             caches the next stage reads. ~45 s.
#   ops       the per-op benchmarks timed, one at a time (Llama-2-7B decode shapes: -m "not
#             extra"): 71 bf16 ones (ours, eager, torch.compile) and 36 on int4 (group 128) or
#             int8 (per row) weights against the torch composite on torch's own weight-only
#             kernels, at batch 1 and 32 (batch 8 is extra). ~110 s: ~45 s for the 23
#             torch.compile rows, ~1 s per autotuned key (~45 keys), ~0.2 s a measurement.
#   report    python -m perf.gpu_report (end-to-end decode, D³ realized vs work ratio) with bf16,
#             int4 and int8 weights, batch 1/8/32, 64 tokens, 2 reps: ~35 s of triton rows
#             (with model builds and CUDA graph captures), ~35 s of torch eager rows (bf16 and
#             int4: torch's CUDA int8 kernel computes one output per thread, minutes at batch 32;
#             the ops stage times it per projection), ~15 s start and copy bandwidth: ~85 s.
#             No transformers row (~15 s more): `python -m perf.gpu_report` alone has it.
#   backfill  python -m perf.backfill_timing: ~20 s
#   engine    python -m perf.engine_bench: ~25 s
#   tp        python -m perf.tp_one_rank: tp=1 in a one-rank NCCL group against no group
#             (llama-3.2-1b shapes, bf16, D3KERNELS_AUTOTUNE=0): ~25 s
# D3_CHECK_STAGES="ops report" runs only those (a rerun within the same session).
#
# Under $OUT (the device tool brings back at most 8 files, 16 MiB each):
#   summary.md          stage, budget, seconds allowed and taken, status; then each stage's table
#   results.tgz         every stage's files (logs, JSON, markdown, PNG), rewritten after each stage
#   tuned/<gpu>.json    the autotune winners (shipped + tuned here, D3KERNELS_TUNED_OUT): commit it
#                       as d3kernels/ops/tuned/<gpu>.json
#   cache/d3cache.tgz.part-NN  the Triton and inductor compile caches (when <= 60 MiB packed):
#                       copy the parts into .d3cache/ (git-ignored) and name .d3cache in the next
#                       call's `carry`; this script unpacks them there.
# The caches live in .d3cache/ under the repo, reached through the fixed path
# /tmp/d3kernels-cache-<uid> because Triton's cache index records absolute paths and the repo's
# path can differ between machines. Installs nothing; needs no network.
# Exit code: 0 when every stage that ran passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

# SETUP: probes and cache unpacking; GRACE: SIGINT to KILL; FINAL: winners count, cache packing.
CHECK_SECONDS=510 SETUP=10 GRACE=10 FINAL=25
STAGES=(tests:140 ops-warm:45 ops:110 report:95 backfill:20 engine:25 tp:30)  # sum: 465 s
total=$((SETUP + GRACE + FINAL)); for spec in "${STAGES[@]}"; do total=$((total + ${spec#*:})); done
[ "$total" -le "$CHECK_SECONDS" ] || { echo "stage budgets add up to $total s > $CHECK_SECONDS s"; exit 1; }
OUT=${OUT:-perf/out}
WORK=perf/out/gpu_check  # every stage's files, packed into $OUT/results.tgz
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT" || exit 1
export PYTHONUNBUFFERED=1

# Compile caches: .d3cache/{triton,inductor}, carried in packed parts.
mkdir -p .d3cache
if compgen -G ".d3cache/d3cache.tgz.part-*" > /dev/null; then
  cat .d3cache/d3cache.tgz.part-* | tar -xzf - -C .d3cache && rm -f .d3cache/d3cache.tgz.part-*
fi
CACHE=/tmp/d3kernels-cache-$(id -u)
if [ -L "$CACHE" ] || [ ! -e "$CACHE" ]; then ln -sfn "$PWD/.d3cache" "$CACHE"; else CACHE=$PWD/.d3cache; fi
export TRITON_CACHE_DIR=$CACHE/triton TORCHINDUCTOR_CACHE_DIR=$CACHE/inductor
CACHE_BEFORE=$(du -sm .d3cache | cut -f1)

# One python start for the probes: versions, the GPU's tuned-file stem, pytest-xdist or not.
PROBE=$(timeout 60 python3 -c "import importlib.util, sys, torch, triton
from d3kernels.ops._tuning import gpu_slug
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)
print('slug:', gpu_slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else '')
print('xdist:', importlib.util.find_spec('xdist') is not None)" 2>&1)
SLUG=$(sed -n 's/^slug: //p' <<< "$PROBE")
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  if [ -n "$SLUG" ]; then head -1 <<< "$PROBE"; else echo "$PROBE"; fi
  echo "commit $(git log -1 --format='%h %cs' 2>/dev/null), $(git status --short 2>/dev/null | wc -l) paths changed"
  echo "started $(date -u +%FT%TZ); compile cache carried in: ${CACHE_BEFORE} MiB"; } \
  > "$WORK/env.txt" 2>&1
TUNED_OUT=$OUT/tuned
XDIST=()
grep -qx "xdist: True" <<< "$PROBE" && XDIST=(-n 12)
PAR_ENV=(OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=1)  # 12 workers on 16 cores

failed=0 deadline=$SETUP
echo "| stage | budget (s) | allowed (s) | took (s) | status |" > "$WORK/stages.md"
echo "| --- | ---: | ---: | ---: | --- |" >> "$WORK/stages.md"

pack() {  # results.tgz and summary.md under $OUT, both replaced whole
  write_summary
  tar -czf "$WORK.tgz" -C "$WORK" . && mv -f "$WORK.tgz" "$OUT/results.tgz"
}

write_summary() {
  { echo "# GPU check"; echo; sed 's/^/    /' "$WORK/env.txt"; echo; cat "$WORK/stages.md"
    if [ -f "$WORK/tests.log" ]; then
      echo; echo "## tests"; echo
      grep -E "^(FAILED|ERROR) " "$WORK/tests.log" | head -30
      grep -E "(passed|failed|error).* in [0-9.]+s" "$WORK/tests.log" | tail -1; fi
    for f in ops_bench gpu_report backfill_timing engine tp_one_rank; do
      if [ -f "$WORK/$f.md" ]; then echo; echo "## $f"; echo; cat "$WORK/$f.md"; fi; done
  } > "$OUT/summary.md.tmp"
  mv -f "$OUT/summary.md.tmp" "$OUT/summary.md"
}

wanted() { [ -z "${D3_CHECK_STAGES:-}" ] || [[ " $D3_CHECK_STAGES " == *" $1 "* ]]; }

stage() {  # stage NAME COMMAND...: run it by its deadline, log to $WORK/NAME.log, record it
  local name=$1 budget=0 spec; shift
  for spec in "${STAGES[@]}"; do [ "${spec%%:*}" = "$name" ] && budget=${spec#*:}; done
  deadline=$((deadline + budget))
  wanted "$name" || return 0
  local allowed=$((deadline - SECONDS)) start=$SECONDS rc status
  if [ "$allowed" -lt 15 ]; then
    status="skipped: no time left"; rc=1
  else
    echo "== $name (up to ${allowed} s)"
    timeout -s INT -k "$GRACE" "$allowed" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
      0) status=ok ;;
      124|137) status="timed out" ;;
      *) status="failed (exit $rc)" ;;
    esac
  fi
  [ "$rc" -eq 0 ] || { failed=1; [ -f "$WORK/$name.log" ] && tail -n 40 "$WORK/$name.log"; }
  echo "| $name | $budget | $allowed | $((SECONDS - start)) | $status |" >> "$WORK/stages.md"
  echo "== $name: $status after $((SECONDS - start)) s"
  pack
}

skip() {  # skip NAME REASON: keep the schedule, record why the stage did not run
  local name=$1 spec
  for spec in "${STAGES[@]}"; do [ "${spec%%:*}" = "$name" ] && deadline=$((deadline + ${spec#*:})); done
  wanted "$name" && echo "| $name | | | 0 | skipped: $2 |" >> "$WORK/stages.md"
  return 0
}

[ -n "$SLUG" ] || { echo "no CUDA GPU seen (see env.txt)"; failed=1; }

stage tests env D3KERNELS_AUTOTUNE=0 "${PAR_ENV[@]}" python3 -m pytest tests/ops \
  tests/test_triton_backend.py tests/test_tuned_configs.py \
  tests/test_backfill_modes.py::test_gpu_graphs_recaptured_when_the_stash_grows \
  -q -p no:cacheprovider "${XDIST[@]}" \
  -rfE --durations=15 --junitxml="$WORK/gpu_tests.xml"

if [ ${#XDIST[@]} -gt 0 ]; then
  # loadgroup: the kv_backfill benchmarks (5 GiB of fixtures) share one worker
  stage ops-warm env "${PAR_ENV[@]}" python3 -m pytest perf/ops -m "not extra" -q \
    -p no:cacheprovider "${XDIST[@]}" --dist loadgroup --benchmark-disable
else
  skip ops-warm "no pytest-xdist"
fi

stage ops env D3KERNELS_TUNED_OUT="$TUNED_OUT" python3 -m pytest perf/ops -m "not extra" \
  --benchmark-only --benchmark-json="$WORK/ops_bench.json" --benchmark-columns=median,iqr,rounds \
  -q -p no:cacheprovider
if [ -f "$WORK/ops_bench.json" ]; then
  title="$(head -1 "$WORK/env.txt"); bf16 activations; weights bf16 unless the shape names int4"
  title+=" (group 128) or int8 (a scale per row); per call, median of timed rounds"
  python3 -m perf.ops.summary "$WORK/ops_bench.json" --out "$WORK/ops_bench.md" --title "$title" \
    > /dev/null
  pack
fi

stage report env D3KERNELS_TUNED_OUT="$TUNED_OUT" python3 -m perf.gpu_report --out "$WORK" \
  --formats bf16 int4 int8 --torch-formats bf16 int4 --no-hf --tokens 64 --reps 2

stage backfill env D3KERNELS_TUNED_OUT="$TUNED_OUT" python3 -m perf.backfill_timing \
  --preset llama-2-7b --device cuda --dtype bfloat16 --batches 1 8 --tokens 32 --reps 2 \
  --out "$WORK"

stage engine env D3KERNELS_TUNED_OUT="$TUNED_OUT" python3 -m perf.engine_bench \
  --preset llama-2-7b --device cuda --dtype bfloat16 --backends triton torch --requests 12 \
  --new-tokens 16 48 --min-free 1 --out "$WORK"

stage tp env D3KERNELS_AUTOTUNE=0 python3 -m perf.tp_one_rank --out "$WORK"

# Winners: how many this run added to what was shipped (plain json: no torch import to wait for).
if [ -n "$SLUG" ] && [ -f "$TUNED_OUT/$SLUG.json" ]; then
  timeout 10 python3 - "$TUNED_OUT/$SLUG.json" "d3kernels/ops/tuned/$SLUG.json" \
    >> "$WORK/env.txt" 2>&1 <<'EOF'
import json
import os
import sys


def keys(path):
    if not os.path.isfile(path):
        return set()
    kernels = json.load(open(path))["kernels"]
    return {(name, json.dumps(e["key"])) for name, es in kernels.items() for e in es}


out, shipped = sys.argv[1:]
new = keys(out)
print(f"tuned: {len(new)} autotune winners in {out}, {len(new - keys(shipped))} not in "
      f"{shipped}: commit it there")
EOF
fi

# Compile caches back, when they fit: Triton's and inductor's, else Triton's alone.
rm -rf "$OUT/cache"
packed=""
for dirs in "triton inductor" "triton"; do
  left=$((CHECK_SECONDS - SECONDS - 3))
  [ "$left" -ge 3 ] || break
  # shellcheck disable=SC2086  # dirs is a word list
  (cd .d3cache && timeout "$left" tar -czf "../$WORK.cache.tgz" $dirs 2> /dev/null) || continue
  size=$(stat -c %s "$WORK.cache.tgz")
  if [ "$size" -le $((60 * 1024 * 1024)) ]; then
    mkdir -p "$OUT/cache"
    split -b 15M -d "$WORK.cache.tgz" "$OUT/cache/d3cache.tgz.part-"
    packed="$dirs, $((size / 1024 / 1024)) MiB packed"
    break
  fi
  packed="too large: $((size / 1024 / 1024)) MiB packed"
done
rm -f "$WORK.cache.tgz"
echo "compile cache: $(du -sm .d3cache | cut -f1) MiB unpacked; in \$OUT/cache: ${packed:-none}" \
  >> "$WORK/env.txt"
echo "finished after $SECONDS s" >> "$WORK/env.txt"
pack
cat "$OUT/summary.md"
echo; cat "$WORK/stages.md"  # again last: the device tool returns the output's tail
exit $failed
