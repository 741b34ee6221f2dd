#!/usr/bin/env bash
# The GPU measurements the benchmarks still need, as one command for a lent machine
# whose python3 already has jax (CUDA), optax, flax and chex, as this project's
# device image does. Run it from the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# It writes into $OUT (default: results/):
#   * the suite's standalone throughput (the rules, the copy limit, Optax's rules,
#     three trees, f32 and bf16) and the rule + adam overhead, timed in interleaved
#     rounds: <device>-<date>.{json,md,png}, with the log beside them;
#   * the same programs' memory traffic on that device (benchmarks/gpu_traffic.py),
#     so that the model and the timings can be compared on one machine.
# About 6 minutes on an H100; each part has its own time limit, so a slow part
# cannot take the other's results with it.
set -u
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
$PY -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/gpu-check-env.log"
timeout 420 $PY benchmarks/run.py --only throughput,overhead --repeats 9 \
  --out "$OUT" --note "benchmarks/gpu_check.sh" 2>&1 | tee "$OUT/gpu-check-run.log"
timeout 120 $PY benchmarks/gpu_traffic.py --json "$OUT/gpu-traffic-local.json" \
  2>&1 | tee "$OUT/gpu-check-traffic.md"
