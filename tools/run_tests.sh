#!/usr/bin/env bash
# The test suite as CI runs it: start the project's local SLURM cluster (tests marked `slurm`
# need it), run pytest (two workers, see below), stop the cluster whatever happened.
# Usage: tools/run_tests.sh PYTEST [ARGS]
set -uo pipefail
PYTEST=${1:-pytest}; shift || true
cd "$(dirname "$0")/.."
START=launch/local_slurm/start.sh
STOP=launch/local_slurm/stop.sh
if [ -x "$START" ] && [ "${BTM_NO_SLURM:-0}" != 1 ]; then
  trap 'bash "$STOP" >/dev/null 2>&1 || true' EXIT
  if bash "$START"; then
    export SLURM_CONF=${SLURM_ROOT:-/tmp/btm-slurm}/etc/slurm.conf
  else
    echo "run_tests: local SLURM cluster did not start; slurm tests will be skipped" >&2
  fi
fi
# Two test processes where pytest-xdist is installed (requirements.txt): most tests wait on
# subprocess start-up, SLURM polls or gloo, so two overlap well on 2 cores. BTM_TEST_WORKERS=0
# runs them in this process, one after another.
WORKERS=${BTM_TEST_WORKERS:-2}
XDIST=()
if [ "$WORKERS" != 0 ] && "$(dirname "$PYTEST")/python" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "$WORKERS" --dist loadgroup)
fi
"$PYTEST" -q "${XDIST[@]}" "$@" tests
rc=$?
if [ "$rc" = 5 ]; then
  echo "run_tests: pytest collected no tests (exit 5)" >&2
  exit 1
fi
exit "$rc"
