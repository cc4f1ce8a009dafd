"""Fast first run (issue 12): the Numba kernels are compiled once and then loaded from the on-disk
cache -- a second process running the pipeline compiles nothing."""
import json
import subprocess
import sys

import pytest

# Runs the whole pipeline (coarse, medium, fine) on a small copy of image_0010, then reports every
# compiled Numba dispatcher of geomfit: how many signatures it loaded from the cache and how many it
# had to compile.
_PROBE = r"""
import json, sys, cv2, numpy as np
import numba
from numba.core.registry import CPUDispatcher
from geomfit.pipeline import reconstruct

img = cv2.imread(sys.argv[1])[..., ::-1]
q = np.array(open(sys.argv[2]).read().split("{")[1].split("}")[0].split(), float).reshape(68, 2)
s = 0.25  # 320x256: large enough for the fine stage's multigrid kernels
small = cv2.resize(img, (320, 256), interpolation=cv2.INTER_AREA)
reconstruct(small, model="sfm", landmarks=q * s, max_side=320, fine=True)
out = {}
for name, mod in list(sys.modules.items()):
    if not (name == "geomfit" or name.startswith("geomfit.")) or mod is None:
        continue
    for attr, obj in list(vars(mod).items()):
        if isinstance(obj, CPUDispatcher) and obj.signatures:
            st = obj.stats
            out[f"{name}.{attr}"] = {"signatures": len(obj.signatures), "hits": sum(st.cache_hits.values()),
                                     "misses": sum(st.cache_misses.values()),
                                     "cached": type(obj._cache).__name__ != "NullCache"}
print("PROBE" + json.dumps(out))
"""


def _probe(data):
    img, pts = data / "images" / "image_0010.png", data / "images" / "image_0010.pts"
    r = subprocess.run([sys.executable, "-c", _PROBE, str(img), str(pts)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")][-1]
    return json.loads(line[5:])


def test_second_process_compiles_nothing(data, monkeypatch):
    for mod, name in [("geomfit.fitting", "fit_landmarks"), ("geomfit.laplacian", "medium_stage"),
                      ("geomfit.fine", "fine_stage")]:
        if not hasattr(pytest.importorskip(mod), name):
            pytest.skip(f"{mod}.{name} not merged")
    monkeypatch.setenv("GEOMFIT_DATA", str(data))
    _probe(data)  # fills the cache where it is empty (a no-op after scripts/setup.sh warmed it)
    second = _probe(data)
    assert second, "the pipeline used no Numba kernel: nothing to check"
    not_cached = sorted(k for k, v in second.items() if not v["cached"])
    assert not_cached == [], f"kernels without cache=True compile in every process: {not_cached}"
    compiled = {k: v for k, v in second.items() if v["misses"] or v["hits"] < v["signatures"]}
    assert compiled == {}, f"compiled again in a second process: {compiled}"
