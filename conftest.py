"""Test-session set-up: the data folder and the repository root on sys.path."""
import os
import pathlib

_here = pathlib.Path(__file__).resolve().parent
if "GEOMFIT_DATA" not in os.environ and (_here.parent / "shared" / "data").is_dir():
    os.environ["GEOMFIT_DATA"] = str(_here.parent / "shared" / "data")

import pytest


def pytest_collection_modifyitems(config, items):
    """Skip CUDA-kernel tests unless a GPU or Numba's CUDA simulator is available."""
    if not any("cudasim" in item.keywords for item in items):
        return
    from geomfit.backend import cuda_available

    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no GPU and NUMBA_ENABLE_CUDASIM is not 1: "
                            "run `NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim` (scripts/test.sh does)")
    for item in items:
        if "cudasim" in item.keywords:
            item.add_marker(skip)
