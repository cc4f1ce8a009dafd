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


def test_kernels_subpackage_from_an_uninstalled_checkout():
    """No symlink: geomfit.kernels is the top-level kernels/ folder, also without the editable
    install's import hook (a checkout on PYTHONPATH, as on the device machine)."""
    import pathlib

    repo = pathlib.Path(geomfit.__file__).resolve().parent.parent
    code = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(getattr(f, '__module__', '')).lower()]
sys.path.insert(0, sys.argv[1])
import geomfit.kernels.multigrid as m, geomfit.render
assert m.__file__.endswith('kernels/multigrid.py') and '/geomfit/kernels/' not in m.__file__, m.__file__
print('ok')
"""
    assert not (repo / "geomfit" / "kernels").exists()
    out = subprocess.run([sys.executable, "-c", code, str(repo)], capture_output=True, text=True, timeout=300,
                         cwd=str(repo / "tests"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_only_the_backend_branches_on_the_array_library():
    """CPU/GPU choices live in geomfit.backend (get_array_module, kernel, force); a solver that
    branches on NumPy versus CuPy itself is flagged here."""
    import pathlib
    import re

    pkg = pathlib.Path(geomfit.__file__).resolve().parent
    pattern = re.compile(r"xp is (not )?np\b|\bis_cupy\(|_FORCE_CUDA|\.get\(\) if ")
    allowed = {"backend.py"}
    files = sorted(pkg.rglob("*.py")) + sorted((pkg.parent / "kernels").glob("*.py"))
    offenders = [f"{p.name}:{i}" for p in files if p.name not in allowed
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
