#!/usr/bin/env bash
# The prepared GPU check, one command on a lent machine (one H200, Python 3.12, torch+CUDA,
# nvcc, no megatron-core, no Transformer Engine, no network), within ~8 minutes:
#
#   bash tools/gpu_check.sh                 # on the GPU machine (after `make gpu-wheels` here)
#   bash tools/gpu_check.sh --cpu-dry-run   # every step that needs no GPU, tiny sizes (CI)
#
# Steps, each logged to $OUT/<step>.log, timed, and summarised in $OUT/summary.json; a failed
# step does not stop the later ones; the exit status is 1 if any step failed:
#   wheels  .whl/ holds every wheel of tools/gpu_wheels.txt (dry run: missing ones are listed)
#   env     a venv with --system-site-packages + those wheels, offline (pip --user if venv
#           fails); dry run: $PYTHON as it is
#   build   csrc/ for sm_90 against the machine's torch (setup.py build_ext --inplace); dry
#           run: skipped (needs nvcc)
#   pytest  pytest -m gpu (the dry run runs the same selection: it must collect tests, which
#           skip without CUDA)
#   mixing  bench/mixing.py --device cuda $MIXING_ARGS (default --quick); dry run: one tiny
#           fused case on the CPU
#   train   bench/gpu_train.py: GPT-2-124M-shaped bf16 `btm train-seed`, tokens/s and MFU;
#           dry run: --cpu-dry-run
# Environment: OUT (default gpu-check-out/), PYTHON (default python3), BTM_GPU_VENV (default
# /tmp/btm-gpu-venv), BTM_GPU_CHECK_BUDGET seconds for all steps (default 470).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: tools/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
VENV=${BTM_GPU_VENV:-/tmp/btm-gpu-venv}
BUDGET=${BTM_GPU_CHECK_BUDGET:-470}
MIXING_ARGS=${MIXING_ARGS:---quick}
WHEELS=$REPO/.whl
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
STEPS_FILE=$OUT/steps.jsonl
: > "$STEPS_FILE"
FAILED=0

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

# run_step NAME TIMEOUT_S CMD...: log, time and record one step (status ok/failed/timeout).
run_step() {
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)) start=$SECONDS rc status
  shift 2
  if [ "$left" -lt 5 ]; then
    say "$name: skipped, the ${BUDGET}s budget is spent"
    record "$name" skipped 0 "budget spent"; FAILED=1; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name: $* (limit ${limit}s)"
  if declare -F "$1" > /dev/null; then  # a function of this script (no timeout needed)
    "$@" > "$OUT/$name.log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  fi
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  [ "$status" = ok ] || FAILED=1
  say "$name: $status (rc=$rc, $((SECONDS - start))s); log: $OUT/$name.log"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /'
  record "$name" "$status" $((SECONDS - start)) "rc=$rc"
}

record() {  # record NAME STATUS SECONDS NOTE
  printf '{"step": "%s", "status": "%s", "seconds": %s, "note": "%s"}\n' "$1" "$2" "$3" "$4" >> "$STEPS_FILE"
}

# ---------------------------------------------------------------- wheels
check_wheels() {
  local missing=0 req name ver
  while read -r req; do
    case $req in ''|\#*) continue ;; esac
    name=${req%%==*}; ver=${req##*==}
    if compgen -G "$WHEELS/${name//-/_}-$ver-*.whl" > /dev/null; then
      echo "present: $req"
    else
      echo "missing: $req"; missing=1
    fi
  done < tools/gpu_wheels.txt
  du -sh "$WHEELS" 2>/dev/null || true
  if [ "$missing" = 1 ]; then
    echo "fill .whl/ with: make gpu-wheels"
    [ "$DRY" = 1 ] && { echo "(dry run: missing wheels are not an error)"; return 0; }
    return 1
  fi
}

# ---------------------------------------------------------------- env
make_env() {
  local reqs
  reqs=$(grep -v '^#' tools/gpu_wheels.txt | grep -v '^$' | tr '\n' ' ')
  if "$PY" -m venv --system-site-packages "$VENV"; then
    "$VENV/bin/python" -m pip install -q --no-index --no-deps --find-links "$WHEELS" $reqs || return 1
    PY_ENV=$VENV/bin/python
  else
    echo "venv failed; installing with pip --user"
    "$PY" -m pip install -q --user --no-index --no-deps --find-links "$WHEELS" $reqs || return 1
    PY_ENV=$PY
  fi
  "$PY_ENV" -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
}

say "start: dry_run=$DRY OUT=$OUT python=$PY budget=${BUDGET}s"
run_step wheels 30 check_wheels

if [ "$DRY" = 1 ]; then
  PY_ENV=$PY
  run_step env 60 "$PY" -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__)"
  say "build: skipped (dry run: needs nvcc and a GPU's torch)"; record build skipped 0 "dry run"
else
  say "env: $VENV"
  start=$SECONDS
  if make_env > "$OUT/env.log" 2>&1; then record env ok $((SECONDS - start)) ""
  else record env failed $((SECONDS - start)) "see env.log"; FAILED=1; PY_ENV=$PY; fi
  tail -n 2 "$OUT/env.log" | sed 's/^/    /'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
  command -v nvcc > /dev/null || export PATH=$PATH:/usr/local/cuda/bin
  run_step build 240 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY_ENV" setup.py build_ext --inplace
fi

run_step pytest 240 "$PY_ENV" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml"

if [ "$DRY" = 1 ]; then
  run_step mixing 120 "$PY_ENV" bench/mixing.py --worker --method fused --k 2 --n 64 --v 1024 \
    --dtype fp32 --device cpu --threads 1
  run_step train 300 "$PY_ENV" bench/gpu_train.py --cpu-dry-run --work "$OUT/gpu_train" --out "$OUT/gpu_train.json"
else
  # shellcheck disable=SC2086  # MIXING_ARGS is a list of arguments
  run_step mixing 150 "$PY_ENV" bench/mixing.py --device cuda $MIXING_ARGS --out "$OUT/mixing.json"
  run_step train 240 "$PY_ENV" bench/gpu_train.py --work "$OUT/gpu_train" --out "$OUT/gpu_train.json"
fi

"$PY" - "$OUT" "$DRY" "$FAILED" <<'EOF'
import json, os, sys
out, dry, failed = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
steps = [json.loads(line) for line in open(os.path.join(out, "steps.jsonl"))]
summary = {"dry_run": dry, "ok": not failed, "steps": steps}
train = os.path.join(out, "gpu_train.json")
if os.path.exists(train):
    t = json.load(open(train))
    summary["train"] = {k: t[k] for k in ("tokens_per_s", "achieved_tflops", "mfu", "gpu", "first_loss",
                                          "last_loss", "device_choices")}
tmp = os.path.join(out, "summary.json.tmp")
with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
os.replace(tmp, os.path.join(out, "summary.json"))
print(json.dumps({s["step"]: s["status"] for s in steps}))
EOF
say "done in ${SECONDS}s: $([ "$FAILED" = 0 ] && echo ok || echo FAILED) (summary: $OUT/summary.json)"
exit "$FAILED"
