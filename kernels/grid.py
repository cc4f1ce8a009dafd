"""Deprecated module name: the multigrid kernels live in ``geomfit.kernels.multigrid``."""
import warnings as _warnings

from .multigrid import *  # noqa: F401,F403
from .multigrid import _PAR, _SER, CUDA, cu_launch, kernel  # noqa: F401

_warnings.warn("geomfit.kernels.grid is deprecated: use geomfit.kernels.multigrid", DeprecationWarning, stacklevel=2)
