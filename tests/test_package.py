"""The top-level package: every exported name resolves, and the core imports without optional deps."""
import subprocess
import sys

import geomfit


def test_every_export_resolves():
    for name in geomfit.__all__:
        assert getattr(geomfit, name) is not None, name


def test_unknown_name_is_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute"):
        geomfit.no_such_thing


def test_core_imports_without_optional_dependencies():
    """Block torch, cupy, sksparse, dlib, face_alignment, h5py: the core still imports and solves."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'cupy', 'cupyx', 'sksparse', 'dlib', 'face_alignment', 'h5py', 'cholespy'}:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import numpy as np, scipy.sparse as sp
import geomfit
from geomfit.backend import factorize_spd, has_cholmod
assert not has_cholmod()
f = factorize_spd(sp.eye(4, format='csc') * 2.0)
assert f.method == 'superlu' and np.allclose(f.solve(np.ones(4)), 0.5)
for name in geomfit.__all__:
    getattr(geomfit, name)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
