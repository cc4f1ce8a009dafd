"""Reading and normalising input photos.

Every stage works on float RGB images in [0, 1] of shape (H, W, 3).  :func:`read_image` turns any
file OpenCV decodes (8- or 16-bit, grayscale, colour, with or without alpha; EXIF orientation
applied) into that, and :func:`as_float_rgb` does the same for arrays.  ``skimage:NAME`` reads a
sample image that ships with scikit-image (``skimage:astronaut``).
"""
from __future__ import annotations

import os
import pathlib
from typing import Tuple, Union

import numpy as np

__all__ = ["read_image", "as_float_rgb", "as_uint8_rgb", "resize_longest", "load_photo", "srgb_to_linear",
           "linear_to_srgb"]


def as_float_rgb(image, name: str = "image") -> np.ndarray:
    """Validate an image array and return it as float64 RGB in [0, 1], shape (H, W, 3).

    Accepts (H, W) grayscale, (H, W, 1), (H, W, 3) RGB and (H, W, 4) RGBA (alpha dropped) of
    dtype uint8 (/255), uint16 (/65535), bool, or float (taken as [0, 1]; clipped).

    Raises
    ------
    TypeError
        Non-numeric arrays.
    ValueError
        Wrong shape, empty image, non-finite values.
    """
    a = np.asarray(image)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise TypeError(f"{name}: expected a numeric image array, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    elif not (a.ndim == 3 and a.shape[2] == 3):
        raise ValueError(f"{name}: shape must be (H, W), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"{name}: image is empty or degenerate ({a.shape[1]}x{a.shape[0]} pixels)")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 65535.0
    if a.dtype == bool:
        return a.astype(np.float64)
    if np.issubdtype(a.dtype, np.integer):
        hi = float(a.max()) if a.size else 1.0
        return a.astype(np.float64) / (255.0 if hi <= 255 else 65535.0)
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return np.clip(a, 0.0, 1.0)


def as_uint8_rgb(image) -> np.ndarray:
    """Float/uint image -> uint8 RGB (H, W, 3)."""
    return np.round(as_float_rgb(image) * 255.0).astype(np.uint8)


def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a photo file as float64 RGB in [0, 1], shape (H, W, 3).

    Parameters
    ----------
    path : str or os.PathLike
        Any format OpenCV decodes (PNG, JPEG, TIFF, BMP, WebP, ...); 16-bit and grayscale files are
        converted correctly.  ``"skimage:NAME"`` loads ``skimage.data.NAME()`` (e.g.
        ``skimage:astronaut``).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file cannot be decoded (corrupt, truncated or not an image), naming the file.
    """
    s = os.fspath(path)
    if s.startswith("skimage:"):
        import skimage.data

        fn = getattr(skimage.data, s.split(":", 1)[1], None)
        if fn is None or not callable(fn):
            raise ValueError(f"{s}: scikit-image has no sample image of that name")
        return as_float_rgb(fn(), name=s)
    import cv2

    p = pathlib.Path(s).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    buf = np.fromfile(str(p), dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) if buf.size else None
    if img is None:
        raise ValueError(f"cannot read image {p}: corrupt, truncated or not an image format OpenCV reads")
    if img.ndim == 3:
        img = img[..., ::-1] if img.shape[2] == 3 else img[..., [2, 1, 0, 3]]
    return as_float_rgb(img, name=str(p))


def resize_longest(image: np.ndarray, max_side: int | None) -> Tuple[np.ndarray, float]:
    """Downscale so that the longest side is at most ``max_side`` (area filter); never upscales.

    Returns
    -------
    image : ndarray
        The resized image (the input itself when no resizing is needed).
    scale : float
        ``new / old`` size ratio (1.0 when unchanged); multiply pixel coordinates by it.
    """
    if max_side is None:
        return image, 1.0
    h, w = image.shape[:2]
    s = max_side / max(h, w)
    if s >= 1.0:
        return image, 1.0
    import cv2

    nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    out = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    # the exact per-axis ratio differs by rounding; use the mean of the two
    return out, 0.5 * (nw / w + nh / h)


def load_photo(image) -> np.ndarray:
    """A path, ``skimage:NAME`` or an array -> float64 RGB (H, W, 3) in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    return as_float_rgb(image)


def srgb_to_linear(x):
    """sRGB-encoded values in [0, 1] -> linear RGB (IEC 61966-2-1 transfer function)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x):
    """Linear RGB in [0, 1] -> sRGB-encoded values (inverse of :func:`srgb_to_linear`); NaN kept."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)
