#!/usr/bin/env bash
# The GPU check, sized by construction for one H200 in 8 minutes (BUDGET_S=480):
# steps in order of value, each with its own time budget and killed at it (`timeout`); a step
# starts only if its budget fits in what is left, else it is skipped. Every result line is
# appended to OUT_DIR/results.md the moment it is measured, so a step cut at its budget keeps
# what it finished; OUT_DIR/summary.md (printed last, also when the script itself is stopped)
# says of every step whether it ran, was cut, failed or was skipped, and how many result
# lines it left.
#   1. kernels-cudnn (60 s): benchmarks/gpu_check.py on cudnn packed and one-document: the
#      start-up numerics check (values, gradients, padding, isolation vs xla) and the
#      forward+backward time at T=4096 against the no-segment cuDNN call;
#   2. trainer-125m (150 s): `python -m phi4_jax.main --config=configs/pretrain.py:125m` end to
#      end (start-up, built-in data, 30 steps, eval, checkpoint), then resumed to step 40;
#   3. 14b-4l@4k-full (200 s): benchmarks/vs_transformers.py, phi4_jax's train step against
#      transformers + torch.compile, both with full activation checkpointing, batch 4; then
#      two more phi4_jax steps traced, their costliest events in OUT_DIR/ops_14b-4l_4k_full.md;
#   4. 14b-4l@4k-none (150 s): the same with no checkpointing on either side;
#   5. kernels-other (45 s): tokamax and pallas_triton through the same check;
#   6. 1b@4k-full (170 s): phi4_jax against torch.compile, batch 8;
#   7. 14b-4l@16k-full (100 s): phi4_jax alone, batch 1.
# Steps 1-3 fit the budget after the wheel install; 4-7 run when earlier steps end early.
# Measured on one H200 (2026-12-04, RESULTS_gpu.md): wheels 3 s, kernels-cudnn 30, the trainer
# ~95 (by hand), 14b-4l@4k 99 / 89, kernels-other 34, 1b 103, 16k 43; BUDGET_S=565 ran all
# of them inside a 15-minute device lease, the machine's start included. A second run (16:01):
# the trainer cut at 120 s near its last steps, torch.compile at 1b past its 67 s share.
#
# From the repository root, on a machine with jax, flax, optax, orbax, torch and
# transformers (no internet needed):
#   bash benchmarks/gpu_wheels.sh     # first, where pip works: the missing packages, ./.whl
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# On a GPU the results and summary are then appended to benchmarks/RESULTS_gpu.md.
# DRY=1 runs the same steps on CPU (tiny sizes, Pallas interpreted) with every budget scaled
# by BUDGET_S/480, writing only to OUT_DIR: the way to check this script without a GPU.
# STEP_BUDGETS=name=seconds,... overrides single budgets (before DRY's scaling).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-/tmp/gpu_check}}"
DRY="${DRY:-0}"
BUDGET_S="${BUDGET_S:-480}"
STEP_BUDGETS="${STEP_BUDGETS:-}"
PLANNED_FOR=480  # the seconds the budgets below are sized for
GRACE_S=5        # after a step's budget, `timeout` waits this long before SIGKILL
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/results.md" STATUS="$OUT_DIR/status.tsv" SUMMARY="$OUT_DIR/summary.md"
: > "$RESULTS"; : > "$STATUS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

summary() {
  {
    echo "## Steps (budget ${BUDGET_S} s, $(( $(date +%s) - START )) s used)"
    echo
    echo "| step | budget s | status | s | result lines |"
    echo "|---|---:|---|---:|---:|"
    while IFS=$'\t' read -r name budget status took lines; do
      echo "| $name | $budget | $status | $took | $lines |"
    done < "$STATUS"
  } > "$SUMMARY"
  cat "$SUMMARY"
  if [[ "$DRY" != 1 ]]; then
    { echo; cat "$RESULTS"; echo; cat "$SUMMARY"
      for ops in "$OUT_DIR"/ops_*.md; do
        [[ -e "$ops" ]] && { echo; echo "### $(basename "$ops" .md)"; echo; cat "$ops"; }
      done; } >> benchmarks/RESULTS_gpu.md
  fi
}
trap summary EXIT
trap 'exit 143' TERM INT

budget_of() {  # NAME PLANNED_SECONDS -> the step's budget after overrides and DRY scaling
  local seconds="$2" pair
  for pair in ${STEP_BUDGETS//,/ }; do
    [[ "${pair%%=*}" == "$1" ]] && seconds="${pair#*=}"
  done
  if [[ "$DRY" == 1 ]]; then seconds=$(( seconds * BUDGET_S / PLANNED_FOR )); fi
  echo $(( seconds > 1 ? seconds : 1 ))
}

step() {  # NAME PLANNED_SECONDS COMMAND...: run within its budget, record how it ended
  local name="$1" budget left before rc status took
  budget=$(budget_of "$1" "$2"); shift 2
  left=$(( DEADLINE - $(date +%s) - GRACE_S ))
  if (( budget > left )); then
    printf '%s\t%s\t%s\t-\t0\n' "$name" "$budget" "skipped: ${left} s left" >> "$STATUS"
    return
  fi
  echo "== $name (budget $budget s) ==" >&2
  before=$(wc -l < "$RESULTS")
  local began; began=$(date +%s)
  timeout --kill-after="$GRACE_S" "$budget" "$@" >> "$OUT_DIR/gpu_check.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - began ))
  case $rc in
    0) status=ok ;;
    124|137) status="cut at budget" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$budget" "$status" "$took" \
    "$(( $(wc -l < "$RESULTS") - before ))" >> "$STATUS"
}

vs_transformers() {  # SHAPE CHECKPOINTING CONTENDERS PLANNED_SECONDS [FLAG...]: a tenth of
  # the step's budget for start-up, the rest shared by the contenders, each bounded by its share
  local budget count
  budget=$(budget_of "$1-$2" "$4")
  count=$(echo "$3" | tr ',' '\n' | wc -l)
  step "$1-$2" "$4" python3 benchmarks/vs_transformers.py --shapes="$1" --checkpointing="$2" \
    --contenders="$3" --timeout=$(( budget * 9 / 10 / count )) --write="$RESULTS" $DRY_FLAG \
    "${@:5}"
}

trainer_run() {  # the trainer end to end, then resumed from its checkpoint; its start-up,
  # step, eval, resume and end lines are result lines (the whole log goes to gpu_check.log)
  local workdir="${TMPDIR:-/tmp}/phi4_gpu_check_trainer"
  local args=(--config="configs/pretrain.py:$TRAINER_SIZE" --workdir="$workdir"
              --config.log.every_steps=10 --config.eval.every_steps=30 --config.eval.batches=2
              --config.checkpoint.every_steps=30
              --config.train.warmup_steps=5)
  rm -rf "$workdir"
  { python3 -m phi4_jax.main "${args[@]}" --config.train.steps=30 &&
    python3 -m phi4_jax.main "${args[@]}" --config.train.steps=40; } 2>&1 | tr '\r' '\n' |
    tee -a "$OUT_DIR/gpu_check.log" |
    grep --line-buffered -E \
      "Attention |^  [a-z_]+: |^step [0-9]+:|Resuming|Run ended|Error" |
    sed -u 's/^/- /' >> "$RESULTS"
}
export -f trainer_run
export OUT_DIR RESULTS

DRY_FLAG=""
if [[ "$DRY" == 1 ]]; then
  DRY_FLAG="--dry_run"
  export JAX_PLATFORMS=cpu TRAINER_SIZE=toy
else
  export TRAINER_SIZE=125m
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    >> "$OUT_DIR/gpu_check.log" 2>&1
  if compgen -G ".whl/*.whl" >/dev/null; then
    step install-wheels 40 python3 -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/phi4_site .whl/*.whl
    export PYTHONPATH="/tmp/phi4_site:$PYTHONPATH"
  fi
  source launch/xla_flags.sh
fi

step kernels-cudnn 60 python3 benchmarks/gpu_check.py --candidates=cudnn,cudnn_single \
  --results="$RESULTS" $DRY_FLAG
step trainer-125m 150 bash -c trainer_run
vs_transformers 14b-4l@4k full phi4_jax,torch_compile 200 --profile_dir="$OUT_DIR"
vs_transformers 14b-4l@4k none phi4_jax,torch_compile 150 --profile_dir="$OUT_DIR"
step kernels-other 45 python3 benchmarks/gpu_check.py --candidates=tokamax,pallas_triton \
  --results="$RESULTS" $DRY_FLAG
vs_transformers 1b@4k full phi4_jax,torch_compile 170
vs_transformers 14b-4l@16k full phi4_jax 100
