"""The GPU benchmark script runs end to end (on NumPy here, the same code the GPU session runs)."""
import importlib.util
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    if "_harness" not in sys.modules:  # the scripts' sibling module (on sys.path when a script runs)
        spec = importlib.util.spec_from_file_location("_harness", ROOT / "benchmarks" / "_harness.py")
        harness = importlib.util.module_from_spec(spec)
        sys.modules["_harness"] = harness
        spec.loader.exec_module(harness)
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_dry_run_on_numpy(tmp_path):
    bench = _load()
    out = tmp_path / "gpu.json"
    res = bench.main(["--xp", "numpy", "--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(bench.SECTIONS) <= set(saved)
    for name in bench.SECTIONS:
        assert "error" not in saved[name], (name, saved[name].get("traceback"))
    # independent references: the known light of the synthetic sphere, SciPy's SuperLU
    assert saved["sh"]["max_abs_err_vs_true_light"] < 1e-10
    # on NumPy, "device" and CPU run the same code: this checks the script's comparisons are wired up
    assert saved["sh"]["max_abs_diff_vs_cpu"] == 0.0
    assert saved["rtv"]["max_abs_diff_vs_cpu"] == 0.0
    assert saved["fine"]["max_abs_depth_diff_vs_cpu"] == 0.0
    assert saved["raster"]["triangle_id_agreement"] == 1.0
    assert saved["laplacian"]["rel_diff_vs_scipy"] < 1e-8  # geomfit's factor against SciPy's SuperLU
    assert saved["laplacian"]["further_solve_median_s"] > 0
    assert np.isclose(saved["fitting"]["rmse_px_median"], saved["fitting"]["cpu_rmse_px_median"])
    assert res["machine"]["xp"] == "numpy"


def test_bench_gpu_section_error_is_recorded(tmp_path, monkeypatch):
    bench = _load()

    def boom(dev, a):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setitem(bench.SECTIONS, "sh", boom)
    res = bench.main(["--xp", "numpy", "--quick", "--only", "sh", "raster", "--out", str(tmp_path / "g.json")])
    assert "no kernel image" in res["sh"]["error"] and "error" not in res["raster"]
