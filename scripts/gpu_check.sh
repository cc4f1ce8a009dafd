#!/usr/bin/env bash
# The prepared device check for a session that is lent a GPU (one `run` call; its run time has not been
# measured yet): the CuPy/CUDA tests on the real GPU, then benchmarks/bench_gpu.py.
# The device image has CuPy, Numba, numba-cuda, SciPy and pytest but no CHOLMOD, trimesh or data folder;
# geomfit runs from the source tree (PYTHONPATH), nothing is installed. Logs and results go to $OUT
# (the device tool's folder) or benchmarks/results.
#   device run:  bash scripts/gpu_check.sh        (timeout_s 540 leaves a minute)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L 2>&1 | tee "$OUT_DIR/gpu_env.log"
"$PY" -c "import cupy, numba, scipy; print('cupy', cupy.__version__, 'numba', numba.__version__, 'scipy', scipy.__version__)" \
  2>&1 | tee -a "$OUT_DIR/gpu_env.log"
# 1. tests that need CuPy or a CUDA device (CPU twins compared on the same machine)
timeout 200 "$PY" -m pytest -q -p no:cacheprovider -rs -k "cupy or cuda or gpu" \
  tests/test_backend.py tests/test_sh.py tests/test_rtv.py tests/test_multigrid.py tests/test_render.py tests/test_fine.py \
  tests/test_laplacian.py tests/test_fitting_kernel.py 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
# 2. the GPU benchmark (each section records its own error and the others still run)
timeout 300 "$PY" benchmarks/bench_gpu.py --out "$OUT_DIR/gpu.json" 2>&1 | tee "$OUT_DIR/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
