#!/usr/bin/env bash
# The test suite as CI runs it: start the project's local SLURM cluster (tests marked `slurm`
# need it), run pytest, stop the cluster whatever happened. Usage: tools/run_tests.sh PYTEST [ARGS]
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
"$PYTEST" -q "$@" tests
rc=$?
if [ "$rc" = 5 ]; then
  echo "run_tests: pytest collected no tests (exit 5)" >&2
  exit 1
fi
exit "$rc"
