"""geomfit: detailed 3D faces from a single photo, by classical optimisation.

The coarse-to-fine pipeline of Jin et al., "High-fidelity 3D face reconstruction with multi-scale
details" (Pattern Recognition Letters 2021) with the Levenberg-Marquardt landmark fitting of Wang et
al., "Low-frequency guided self-supervised learning for high-fidelity 3D face reconstruction in the
wild" (ICME 2020): photo -> 68 landmarks -> 3DMM fit (coarse) -> Laplacian deformation
(medium) -> SH lighting, RTV albedo and phased shape-from-shading on the depth map (fine).

Every solver takes NumPy arrays (CPU) or CuPy arrays (GPU) and returns arrays on the same device;
see :mod:`geomfit.backend`. Public names are imported lazily, so ``import geomfit`` stays fast and
works without the optional dependencies (CuPy, torch, detectors).
"""
import os as _os
import sys as _sys
from ._lazy import lazy_exports as _lazy_exports

__version__ = "0.1.0"


def _source_tree_kernels():
    """``geomfit.kernels`` is the repository's top-level ``kernels/`` folder (setup.py installs it
    there with ``package_dir``). When geomfit runs from a checkout that is not installed
    (``PYTHONPATH=<repo>``), register that folder as the subpackage; an installed geomfit has its
    own ``geomfit/kernels`` and is left alone."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    src = _os.path.join(_os.path.dirname(here), "kernels")
    if "geomfit.kernels" in _sys.modules or _os.path.isdir(_os.path.join(here, "kernels")) \
            or not _os.path.isfile(_os.path.join(src, "__init__.py")):
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("geomfit.kernels", _os.path.join(src, "__init__.py"),
                                                  submodule_search_locations=[src])
    mod = importlib.util.module_from_spec(spec)
    _sys.modules["geomfit.kernels"] = mod
    spec.loader.exec_module(mod)


_source_tree_kernels()

# defining module -> public names re-exported here
_MODULES = {
    "geomfit.model": ("MorphableModel",),
    "geomfit.backend": ("get_array_module", "factorize_spd"),
    "geomfit.io": ("load_model", "save_model", "read_pts", "write_pts", "read_landmark_mapping", "read_contours"),
    "geomfit.mesh": ("vertex_normals", "face_normals", "vertex_adjacency", "mass_matrix", "subdivide", "uniform_laplacian", "cotangent_laplacian", "mean_curvature",
                     "to_trimesh", "from_trimesh", "save_mesh"),
    "geomfit.camera": ("ScaledOrthographic", "euler_to_matrix", "matrix_to_euler", "rodrigues", "matrix_to_rodrigues"),
    "geomfit.encodings": ("encode_dae", "encode_dce"),
    "geomfit.render": ("Raster", "rasterize", "interpolate", "render_depth", "depth_normals"),
    "geomfit.fitting": ("fit_landmarks", "fit_landmarks_multi", "LandmarkFit"),
    "geomfit.pipeline": ("reconstruct", "Reconstruction"),
    "geomfit.batch": ("reconstruct_many",),
    "geomfit.landmarks": ("detect_landmarks",),
    "geomfit.metrics": ("depth_mae", "micc_errors", "rigid_icp", "landmark_nme"),
    "geomfit.data": ("resolve_model", "download_model"),
    "geomfit.photo": ("read_image",),
    "geomfit.rtv": ("rtv_smooth", "rtv_weights", "rtv_energy"),
    "geomfit.multigrid": ("solve_screened_poisson",),
    "geomfit.sh": ("sh_basis", "shade", "fit_sh_lighting"),
    "geomfit.fine": ("fine_stage", "FineResult", "solve_albedo", "solve_specular", "solve_depth"),
    "geomfit.uv": ("uv_texture", "uv_render", "UVTexture"),
    "geomfit.laplacian": ("LaplacianDeformer", "laplacian_deform", "medium_stage", "ibug_region_weights"),
}
_EXPORTS = _lazy_exports("geomfit", _MODULES, globals(), extra_all=["__version__"])
