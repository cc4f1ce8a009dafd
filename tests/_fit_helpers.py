"""Shared helpers for the fitting tests: build the Surrey model with expressions and landmarks."""
import json
import pathlib

import numpy as np

from geomfit.model import MorphableModel


def _parse_mapping(path):
    import tomllib

    with open(path, "rb") as f:
        d = tomllib.load(f)
    return {int(k): int(v) for k, v in d["landmark_mappings"].items()}


def load_sfm(sfm_dir):
    """SFM 3448 + 6 blendshapes + iBUG mapping + contours (geomfit.io when available, else eos)."""
    sfm_dir = pathlib.Path(sfm_dir)
    try:
        from geomfit.io import load_model  # noqa: F401

        return load_model(sfm_dir / "sfm_shape_3448.bin",
                          expressions=sfm_dir / "expression_blendshapes_3448.bin",
                          landmarks=sfm_dir / "ibug_to_sfm.txt",
                          contours=sfm_dir / "sfm_model_contours.json")
    except (ImportError, AttributeError):
        pass
    import eos

    m = eos.morphablemodel.load_model(str(sfm_dir / "sfm_shape_3448.bin"))
    sm = m.get_shape_model()
    n = len(sm.get_mean()) // 3
    mean = np.asarray(sm.get_mean(), dtype=np.float64).reshape(n, 3)
    basis = np.asarray(sm.get_rescaled_pca_basis(), dtype=np.float64).reshape(n, 3, -1)
    bs = eos.morphablemodel.load_blendshapes(str(sfm_dir / "expression_blendshapes_3448.bin"))
    exp = np.stack([np.asarray(b.deformation, dtype=np.float64).reshape(n, 3) for b in bs], axis=2)
    faces = np.asarray(sm.get_triangle_list(), dtype=np.int64)
    cont = json.load(open(sfm_dir / "sfm_model_contours.json"))["model_contour"]
    return MorphableModel(mean=mean, id_basis=basis, exp_basis=exp, faces=faces,
                          landmarks=_parse_mapping(sfm_dir / "ibug_to_sfm.txt"),
                          contours={"right": cont["right_contour"], "left": cont["left_contour"]},
                          name="sfm_shape_3448")


def read_pts(path):
    try:
        from geomfit.io import read_pts as rp

        return np.asarray(rp(path), dtype=np.float64)
    except (ImportError, AttributeError):
        pass
    lines = pathlib.Path(path).read_text().split("{")[1].split("}")[0].split()
    return np.asarray(lines, dtype=np.float64).reshape(-1, 2)
