"""Model and landmark-file I/O: eos ``.bin``, BFM 2009/2017/2019, FLAME, geomfit ``.npz``, ``.pts``,
eos landmark mappings (TOML) and contour files (JSON). See docs/models.md."""
from .eos import read_eos_blendshapes, read_eos_model
from .landmarks import read_contour_landmarks, read_contours, read_landmark_mapping, read_pts, write_pts
from .models import detect_format, load_model
from .npz import save_model

__all__ = [
    "load_model", "save_model", "detect_format", "read_eos_model", "read_eos_blendshapes",
    "read_pts", "write_pts", "read_landmark_mapping", "read_contour_landmarks", "read_contours",
]
