#!/usr/bin/env bash
# Set up a fresh Linux machine for geomfit: system packages, a virtual environment at .venv in the
# repository root, and geomfit installed into it (editable) with every optional extra that installs here.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
if command -v apt-get >/dev/null 2>&1; then
  # CHOLMOD (scikit-sparse) needs SuiteSparse headers; OpenBLAS makes its factorisations 2-4x faster.
  if ! dpkg -s libsuitesparse-dev libopenblas0-pthread >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libsuitesparse-dev libopenblas0-pthread >/dev/null
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip wheel setuptools
# torch: pin the CPU build (a looser requirement pulls a multi-GB CUDA build).
python -m pip install -q "torch==2.13.0"
# scikit-sparse 0.5 needs SuiteSparse >= 7.4; older systems build 0.4.x.
python -m pip install -q "numpy" "cython" "scipy"
python -m pip install -q --no-build-isolation "scikit-sparse<0.5" || echo "scikit-sparse did not build: geomfit falls back to SciPy"
python -m pip install -q -e ".[all,dev]"
echo "geomfit installed in $(pwd)/.venv"

# Compile the Numba kernels now and cache them on disk (geomfit/kernels/__pycache__), so that the first
# `geomfit reconstruct` takes seconds instead of a minute of JIT compilation. Needs the Surrey model
# (GEOMFIT_DATA or `geomfit download-model sfm`, which is then worth following by this script again).
if [ "${GEOMFIT_NO_WARM:-}" = 1 ]; then
  echo "GEOMFIT_NO_WARM=1: Numba caches not warmed"
elif python -c "from geomfit.data import resolve_model; resolve_model('sfm')" >/dev/null 2>&1; then
  warm=$(mktemp -d)
  t0=$(date +%s)
  if python -m geomfit reconstruct skimage:astronaut -o "$warm/astronaut" -q >/dev/null; then
    echo "Numba kernels compiled and cached in $(( $(date +%s) - t0 )) s"
  else
    echo "warning: warming the Numba caches failed; the first run will compile them"
  fi
  rm -rf "$warm"
else
  echo "note: no Surrey model found (GEOMFIT_DATA, or run: geomfit download-model sfm); the first reconstruction will compile the Numba kernels (about 30-50 s once)"
fi
