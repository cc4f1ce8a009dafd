#!/usr/bin/env bash
# The test command: the whole suite on the CPU, then the Numba CUDA kernels under the CUDA simulator.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
if [ -z "${GEOMFIT_DATA:-}" ] && [ -d ../shared/data ]; then export GEOMFIT_DATA="$(cd ../shared/data && pwd)"; fi
"$PY" -m pytest -q "$@"
# CUDA kernels on the CPU (slow; small inputs). Exit code 5 = no tests collected is not a failure.
set +e
NUMBA_ENABLE_CUDASIM=1 "$PY" -m pytest -q -m cudasim "$@"
rc=$?
set -e
[ $rc -eq 5 ] && rc=0
exit $rc
