"""The iBUG 68-point landmark scheme: geomfit's one definition, 0-based indices.

The 68 points of the 300-W challenge (Sagonas, Tzimiropoulos, Zafeiriou and Pantic, "300 Faces
in-the-Wild Challenge: the first facial landmark localization challenge", ICCV Workshops 2013),
the order of dlib's and FAN's detectors and of the ``.pts`` files. Arrays of landmarks are indexed
with the 0-based constants below. Papers, ``.pts`` viewers and eos's mapping files
(``ibug_to_sfm.txt``, read into ``MorphableModel.landmarks``) number the points 1-68: point ``i``
here is iBUG number ``i + 1`` (:func:`number`, :func:`index`).

"Right" and "left" are the subject's (the right eye appears on the left of a frontal photo).
"""
from __future__ import annotations

from typing import Dict

__all__ = ["N_LANDMARKS", "REGIONS", "JAW", "BROWS", "NOSE", "RIGHT_EYE", "LEFT_EYE", "EYES", "MOUTH",
           "OUTER_LIPS", "INNER_LIPS", "CHIN", "CONTOUR_RIGHT", "CONTOUR_LEFT", "OUTER_EYE_CORNERS",
           "number", "index"]

N_LANDMARKS = 68

JAW = range(0, 17)  # iBUG 1-17, the face contour from the subject's right to left
BROWS = range(17, 27)  # iBUG 18-27
NOSE = range(27, 36)  # iBUG 28-36
RIGHT_EYE = range(36, 42)  # iBUG 37-42
LEFT_EYE = range(42, 48)  # iBUG 43-48
EYES = range(36, 48)
MOUTH = range(48, 68)  # iBUG 49-68
OUTER_LIPS = range(48, 60)  # iBUG 49-60
INNER_LIPS = range(60, 68)  # iBUG 61-68

#: The chin (iBUG 9) and the two halves of the jaw contour around it (iBUG 1-8 and 10-17): the
#: contour points slide along the model's silhouette in the landmark fit.
CHIN = 8
CONTOUR_RIGHT = range(0, 8)
CONTOUR_LEFT = range(9, 17)

#: Outer eye corners (iBUG 37 and 46): the 300-W inter-ocular normalisation.
OUTER_EYE_CORNERS = (36, 45)

#: Regions by name (0-based index ranges; together they cover all 68 points once).
REGIONS: Dict[str, range] = {"jaw": JAW, "brows": BROWS, "nose": NOSE, "eyes": EYES, "mouth": MOUTH}


def number(i: int) -> int:
    """The 1-based iBUG number of 0-based point ``i`` (eos mapping files, papers)."""
    if not 0 <= int(i) < N_LANDMARKS:
        raise ValueError(f"iBUG point index must be in [0, 68), got {i}")
    return int(i) + 1


def index(n: int) -> int:
    """The 0-based index of 1-based iBUG number ``n``."""
    if not 1 <= int(n) <= N_LANDMARKS:
        raise ValueError(f"iBUG number must be in [1, 68], got {n}")
    return int(n) - 1
