import os
import pathlib
import signal

import pytest


def pytest_configure(config):
    # A suite started in the background by a non-interactive shell (`cmd &`) inherits SIGINT ignored:
    # Python then installs no KeyboardInterrupt handler and every child process starts with SIGINT
    # ignored too, so the Ctrl-C tests (test_reliability, test_batch) would test nothing but the
    # shell.  Restore Python's own handler (children get the default action again on exec).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
