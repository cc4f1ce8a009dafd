"""The shared plumbing of the benchmark scripts: one timer, the machine's state, results files.

Every script in ``benchmarks/`` imports geomfit as installed (``pip install -e .``; on the device
machine the checkout is on ``PYTHONPATH``) and this module as its sibling (a script's own folder is
on ``sys.path`` when it runs). Usage::

    from _harness import Timer, environment, ratio, write_results

    t = Timer(repeats=5).run(lambda: solve(...))     # median / min / all runs, in seconds
    peer = Timer(repeats=5).run(lambda: peer_solve(...))
    write_results("name", {"geomfit": t.as_dict(), "peer": peer.as_dict(),
                           "speedup": ratio(peer.median, t.median)})

``write_results`` adds :func:`environment` (machine, versions, git commit, load average at the
start of the script and at the end) and writes ``benchmarks/results/<name>.json`` atomically.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
_LOAD_AT_IMPORT = os.getloadavg() if hasattr(os, "getloadavg") else None

__all__ = ["Timer", "Timing", "median_time", "ratio", "environment", "write_results", "tests_module", "ROOT",
           "RESULTS"]


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls (and process CPU seconds); ``result`` of the last call."""

    runs: List[float]
    cpu_runs: List[float] = field(default_factory=list)
    result: Any = None

    @property
    def median(self) -> float:
        return float(statistics.median(self.runs))

    @property
    def min(self) -> float:
        return float(min(self.runs))

    @property
    def cpu_median(self) -> float:
        return float(statistics.median(self.cpu_runs)) if self.cpu_runs else float("nan")

    def as_dict(self, scale: float = 1.0, unit: str = "s") -> dict:
        """``median_<unit>``, ``min_<unit>``, ``runs_<unit>`` (and CPU medians) scaled by ``scale``."""
        d = {f"median_{unit}": self.median * scale, f"min_{unit}": self.min * scale,
             f"runs_{unit}": [r * scale for r in self.runs]}
        if self.cpu_runs:
            d[f"cpu_median_{unit}"] = self.cpu_median * scale
        return d


class Timer:
    """Times ``fn()``: ``warmup`` untimed calls (JIT compilation), then ``repeats`` timed ones.

    ``sync`` (e.g. ``cupy.cuda.Device().synchronize``) is called before the clock starts and
    before it stops, so that asynchronous GPU work is counted.
    """

    def __init__(self, repeats: int = 5, warmup: int = 0, sync: Optional[Callable[[], Any]] = None):
        self.repeats = max(int(repeats), 1)
        self.warmup = max(int(warmup), 0)
        self.sync = sync or (lambda: None)

    def run(self, fn: Callable[[], Any]) -> Timing:
        out = None
        for _ in range(self.warmup):
            out = fn()
        wall, cpu = [], []
        for _ in range(self.repeats):
            self.sync()
            t, c = time.perf_counter(), time.process_time()
            out = fn()
            self.sync()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return Timing(wall, cpu, out)


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 0) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn()`` (after ``warmup`` untimed calls)."""
    return Timer(repeats, warmup).run(fn).median


def ratio(slow: float, fast: float) -> float:
    """``slow / fast`` (a speed-up), NaN when ``fast`` is not positive."""
    return float(slow) / float(fast) if fast and fast > 0 else float("nan")


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def environment() -> dict:
    """Machine, library versions, thread counts, git commit and load averages (start, now)."""
    import numpy as np

    env = {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
           "python": platform.python_version(), "numpy": np.__version__, "git_commit": _git_commit(),
           "loadavg_start": list(_LOAD_AT_IMPORT) if _LOAD_AT_IMPORT else None,
           "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    for mod in ("scipy", "numba", "cupy"):
        m = sys.modules.get(mod)
        if m is not None:
            env[mod] = getattr(m, "__version__", None)
    try:
        import numba

        env["numba_threads"] = numba.get_num_threads()
    except Exception:
        pass
    return env


def write_results(name: str, data: dict, out: Optional[os.PathLike] = None) -> pathlib.Path:
    """Write ``data`` plus ``environment`` as JSON to ``out`` (default ``benchmarks/results/<name>.json``).

    The file is written to a temporary name and renamed, so a killed run leaves the previous file.
    """
    path = pathlib.Path(out) if out is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(data)
    payload.setdefault("environment", environment())
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    return path


def tests_module(name: str):
    """Import ``tests/<name>.py`` (the tests' synthetic models and meshes) without touching sys.path."""
    key = f"_geomfit_tests_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, ROOT / "tests" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod
