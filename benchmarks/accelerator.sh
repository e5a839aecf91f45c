#!/usr/bin/env bash
# The accelerator figures of docs/performance.md in one run: seconds per
# update and the device's peak memory (benchmarks/step.py) at the release's
# 321x321 and the paper's 730x730 crops, XLA's buffers (benchmarks/memory.py)
# and the association benchmark. Each part runs under its own time limit
# inside a whole-run budget (BUDGET_S, default 540 s), so that a slow compile
# costs one figure, not the run; everything is printed and, with LOG set,
# appended to that file.
#
#   bash benchmarks/accelerator.sh                  # on a GPU or TPU host
#   BUDGET_S=900 LOG=/tmp/acc.log bash benchmarks/accelerator.sh
set -u
cd "$(dirname "$0")/.." || exit 1
BUDGET_S=${BUDGET_S:-540}
LOG=${LOG:-/dev/null}
START=$(date +%s)
export PYTHONUNBUFFERED=1

part() {  # part LIMIT_S COMMAND...
  local limit=$1; shift
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if ((left < 20)); then
    echo "### skipped (budget spent): $*" | tee -a "$LOG"; return
  fi
  ((limit > left)) && limit=$left
  echo "### [$(($(date +%s) - START)) s] $* (limit ${limit} s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | grep -v "^WARNING\|^I0000\|^W0000\|cuda_timer" | tee -a "$LOG"
  echo "### exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

# On an H200 (docs/performance.md), with XLA's default autotuning the
# updates did not compile within the minutes available, and with
# XLA_FLAGS=--xla_gpu_autotune_level=0 the R101 update compiled in well
# under a minute. Hence the generous limits, in order of priority.
part 30 python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
part 300 python3 benchmarks/step.py --terms=ce,all --steps=5 --profile=40
part 240 python3 benchmarks/step.py --crop=730 --remat=block --steps=5
part 240 python3 benchmarks/step.py --crop=730 --remat=block --dtype=bfloat16 --steps=5
part 240 python3 benchmarks/step.py --crop=730 --remat=none --steps=5
part 240 python3 benchmarks/step.py --crop=730 --remat=block --batch=2 --steps=5
part 120 python3 benchmarks/association.py --chunk_sizes=none,256
part 400 python3 benchmarks/memory.py --dtypes=float32,bfloat16 --remats=block,none
echo "### done in $(($(date +%s) - START)) s" | tee -a "$LOG"
