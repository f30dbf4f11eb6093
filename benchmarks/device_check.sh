#!/usr/bin/env bash
# The prepared GPU check (issue 15): mixed precision for every learner, two processes on one GPU, and the learner
# benchmark on CUDA, in at most ~8 minutes on one GPU. Numbers go to benchmarks/results/gpu/<device>/ (commit them).
#
#   bash benchmarks/device_check.sh              # on a machine with one CUDA GPU
#   bash benchmarks/device_check.sh --cpu-only   # tests the script on the CPU (small inputs); skips and names the
#                                                # CUDA-only parts (fp16 + scaler, nccl, the CUDA benchmark);
#                                                # writes to benchmarks/out/device_check_cpu/ (not committed)
#
# Options: --out DIR (another output folder), --python PATH (default .venv/bin/python, else python3).
# Each part runs under its own time limit, so one part that hangs cannot use the others' time; the exit status is
# non-zero when any part failed or timed out, and summary.md says which.
set -uo pipefail
cd "$(dirname "$0")/.."

CPU_ONLY=0
OUT=""
PY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-only) CPU_ONLY=1 ;;
    --out) OUT="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown option $1 (use --cpu-only, --out DIR, --python PATH)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export MEGATRON_DISABLE_PLUGIN_AUTOLOAD=1 PYTHONUNBUFFERED=1

FLAG=()
if [ "$CPU_ONLY" = 1 ]; then
  FLAG=(--cpu-only)
  export OMP_NUM_THREADS=1
  [ -n "$OUT" ] || OUT=benchmarks/out/device_check_cpu
  # time limits (s) for the CPU test: small inputs, one thread
  T_AMP=420; T_DIST=300; T_BENCH=300; T_DATA=300; T_FAM=300
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "device_check.sh: no CUDA device visible to $PY; use --cpu-only to test the script on the CPU" >&2
    exit 2
  fi
  if [ -z "$OUT" ]; then
    OUT="benchmarks/results/gpu/$("$PY" benchmarks/device_check.py device-slug)"
  fi
  # budget on one GPU: 10 minutes in all, start-up included
  T_AMP=180; T_DIST=150; T_BENCH=120; T_DATA=120; T_FAM=150
fi
mkdir -p "$OUT"
rm -f "$OUT"/amp.json "$OUT"/families.json "$OUT"/distributed.json "$OUT"/bench_learners.json "$OUT"/bench_learners.skipped "$OUT"/data.json
echo "device check -> $OUT"
START=$(date +%s)
status=0

echo "== 1/3 mixed precision: every learner with amp off / bf16 / fp16"
timeout --kill-after=10 "$T_AMP" "$PY" benchmarks/device_check.py amp --out "$OUT" "${FLAG[@]}" 2>&1 | tee "$OUT/amp.log" \
  || { echo "amp: FAILED (see above) or timed out (${T_AMP} s)"; status=1; }

echo "== mmdet families (issue 23): one meta-step each with amp off / bf16 / fp16"
timeout --kill-after=10 "$T_FAM" "$PY" benchmarks/device_check.py families --out "$OUT" "${FLAG[@]}" 2>&1 | tee "$OUT/families.log" \
  || { echo "families: FAILED (see above) or timed out (${T_FAM} s)"; status=1; }

echo "== 2/3 two processes on one device (nccl, else gloo) vs one process"
timeout --kill-after=10 "$T_DIST" "$PY" benchmarks/device_check.py distributed --out "$OUT" "${FLAG[@]}" 2>&1 | tee "$OUT/distributed.log" \
  || { echo "distributed: FAILED (see above) or timed out (${T_DIST} s)"; status=1; }

echo "== 3/3 learner benchmark"
if [ "$CPU_ONLY" = 1 ]; then
  # the same script path on the CPU, shortened; CUDA timings and memory are what it cannot give here
  BENCH=(--device cpu --threads 1 --input-size 64 --inner-steps 3 --repeats 1 --learners maml,maml-ckpt,anil,finetune)
  echo "skipped on CPU: CUDA timings (the benchmark runs shortened on the CPU instead)"
else
  # every learner, plus second-order MAML with checkpoint_inner_steps (peak CUDA memory saved, time it costs)
  BENCH=(--device cuda --inner-steps 3 --learners maml,maml-ckpt,maml-fo,reptile,anil,proto,finetune)
fi
if timeout --kill-after=10 "$T_BENCH" "$PY" benchmarks/bench_learners.py "${BENCH[@]}" 2>&1 | tee "$OUT/bench_learners.log"; then
  cp benchmarks/out/bench_learners.json "$OUT/bench_learners.json"
else
  echo "bench_learners: FAILED (see above) or timed out (${T_BENCH} s)"; status=1
fi

echo "== data path: train-step rates, the loader with this machine's cores, the share of step time waiting for data"
timeout --kill-after=10 "$T_DATA" "$PY" benchmarks/device_check.py data --out "$OUT" "${FLAG[@]}" 2>&1 | tee "$OUT/data.log" \
  || { echo "data: FAILED (see above) or timed out (${T_DATA} s)"; status=1; }

"$PY" benchmarks/device_check.py summary --out "$OUT" "${FLAG[@]}" || status=1
echo "device check took $(( $(date +%s) - START )) s; status $status; results in $OUT"
exit $status
