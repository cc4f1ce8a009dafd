import os
import pathlib

import pytest


def data_dir():
    """The real-data folder (GEOMFIT_DATA), or None."""
    d = os.environ.get("GEOMFIT_DATA")
    return pathlib.Path(d) if d and pathlib.Path(d).is_dir() else None


@pytest.fixture(scope="session")
def data():
    d = data_dir()
    if d is None:
        pytest.skip("GEOMFIT_DATA is not set or does not exist: real-data test skipped")
    return d


@pytest.fixture(scope="session")
def sfm_dir(data):
    d = data / "sfm"
    if not (d / "sfm_shape_3448.bin").is_file():
        pytest.skip(f"{d}/sfm_shape_3448.bin not found: Surrey-model test skipped")
    return d
