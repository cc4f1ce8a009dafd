"""Reading and normalising input photos.

Every stage works on float RGB images in [0, 1] of shape (H, W, 3).  :func:`read_image` turns any
file OpenCV decodes (8- or 16-bit, grayscale, colour, with or without alpha; EXIF orientation
applied) into that, and :func:`as_float_rgb` does the same for arrays.  ``skimage:NAME`` reads a
sample image that ships with scikit-image (``skimage:astronaut``).  :func:`decode_image` is the one
reader of image files (stored values; :func:`read_image` and the command line use it).  :func:`as_float_image` is
geomfit's one rule for turning image dtypes into floats (any channel count, NumPy or CuPy); every
module that accepts images uses it.
"""
from __future__ import annotations

import os
import pathlib
from typing import Tuple, Union

import numpy as np

from .backend import get_array_module

__all__ = ["read_image", "decode_image", "ImageReadError", "as_float_image", "as_float_rgb", "as_uint8_rgb", "resize_longest", "load_photo", "srgb_to_linear",
           "linear_to_srgb"]


def as_float_image(image, name: str = "image"):
    """Validate an image and return it as float64 (same shape, same device): geomfit's one image normalisation.

    The dtype decides the scale, as scikit-image's ``img_as_float`` does for the types that carry
    one, so that integer images map to [0, 1]:

    * float: kept as given (float64);
    * bool: 0 and 1;
    * uint8 and uint16: divided by 255 and 65535 (8- and 16-bit files);
    * every other integer type (signed integers, wider unsigned ones) holds 8- or 16-bit
      intensities in a wider container (``np.array`` of a list, integer arithmetic): divided by
      255 when the largest value is at most 255, else by 65535. Unlike scikit-image, a signed
      integer image is not divided by the type's maximum (an int64 image of 0-255 values would
      become ~1e-17), and negative values or values above 65535 are refused.

    Parameters
    ----------
    image : array (H, W) or (H, W, C), NumPy or CuPy (or anything ``numpy.asarray`` accepts)
    name : str
        Name used in error messages.

    Returns
    -------
    array (H, W) or (H, W, C), float64, on the device of ``image``

    Raises
    ------
    ValueError
        Not 2-D or 3-D, empty, NaN or infinite values, negative or over-16-bit integer values.
    TypeError
        Not a numeric image (complex, object, strings).

    Examples
    --------
    >>> import numpy as np
    >>> as_float_image(np.array([[0, 51], [255, 102]], np.uint8))
    array([[0. , 0.2],
           [1. , 0.4]])
    >>> as_float_image(np.array([[0, 51], [255, 102]]))  # int64 holding 8-bit values
    array([[0. , 0.2],
           [1. , 0.4]])
    """
    if not (hasattr(image, "shape") and hasattr(image, "dtype")):
        image = np.asarray(image)
    xp = get_array_module(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (H, W) or (H, W, C), got shape {tuple(image.shape)}")
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(image.shape)})")
    dt = np.dtype(image.dtype)
    if dt == np.bool_:
        return image.astype(xp.float64)
    if dt in (np.uint8, np.uint16):
        return image.astype(xp.float64) / float(np.iinfo(dt).max)
    if dt.kind in "ui":
        lo, hi = int(image.min()), int(image.max())
        if lo < 0:
            raise ValueError(f"{name} is an integer image with negative values (min {lo}): pass floats")
        if hi > 65535:
            raise ValueError(f"{name} is an integer image with values up to {hi}, more than 16 bits: pass floats "
                             "in [0, 1] or a uint8/uint16 image")
        return image.astype(xp.float64) / (255.0 if hi <= 255 else 65535.0)
    if dt.kind != "f":
        raise TypeError(f"{name} must be a numeric image (float, integer or bool), got dtype {dt}")
    out = image.astype(xp.float64, copy=False)
    if not bool(xp.isfinite(out).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def as_float_rgb(image, name: str = "image") -> np.ndarray:
    """Validate an image array and return it as float64 RGB in [0, 1], shape (H, W, 3).

    Accepts (H, W) grayscale, (H, W, 1), (H, W, 3) RGB and (H, W, 4) RGBA (alpha dropped); dtypes
    are converted by :func:`as_float_image` and floats are clipped to [0, 1].

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
    out = as_float_image(a, name)
    return np.clip(out, 0.0, 1.0) if a.dtype.kind == "f" else out


def as_uint8_rgb(image) -> np.ndarray:
    """Float/uint image -> uint8 RGB (H, W, 3)."""
    return np.round(as_float_rgb(image) * 255.0).astype(np.uint8)


class ImageReadError(ValueError):
    """An image file that exists but cannot be read or decoded.

    ``str(e)`` is ``"cannot read image PATH: REASON"``; ``e.path`` and ``e.reason`` hold the parts."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = path, reason


def decode_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Decode an image file to its stored pixel values: geomfit's one image-file reader.

    Unlike :func:`read_image` the values are not normalised: a 16-bit depth PNG comes back as uint16
    counts. Channels are in RGB(A) order; EXIF orientation is applied (the frame a viewer shows).

    Parameters
    ----------
    path : str or os.PathLike
        Any format OpenCV decodes.

    Returns
    -------
    ndarray
        (H, W) for grayscale, (H, W, 3) RGB, (H, W, 4) RGBA; the file's dtype (uint8, uint16, float32).

    Raises
    ------
    FileNotFoundError
        Nothing (or no regular file) at ``path``.
    ImageReadError
        A folder, an unreadable, empty, corrupt or truncated file, or one OpenCV refuses (e.g. a
        header claiming more pixels than OpenCV's limit); the message names the file.
    """
    import cv2

    p = pathlib.Path(os.fspath(path)).expanduser()
    if p.is_dir():
        raise ImageReadError(p, "it is a folder, not an image file")
    if not p.is_file():  # also FIFOs and devices, whose reading could block
        raise FileNotFoundError(f"image file not found: {p}")
    try:
        buf = np.fromfile(str(p), dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(p, e.strerror or str(e)) from e
    if buf.size == 0:
        raise ImageReadError(p, "the file is empty (0 bytes)")
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as e:
        raise ImageReadError(p, "OpenCV could not decode it (" + str(e).strip().splitlines()[-1][:200] + ")") from e
    if img is None:
        raise ImageReadError(p, "corrupt, truncated or not an image format OpenCV reads")
    if img.ndim == 3:
        img = img[..., ::-1] if img.shape[2] == 3 else img[..., [2, 1, 0, 3]]
    return img


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
        The file cannot be decoded (corrupt, truncated or not an image: :class:`ImageReadError`),
        naming the file.
    """
    s = os.fspath(path)
    if s.startswith("skimage:"):
        import skimage.data

        fn = getattr(skimage.data, s.split(":", 1)[1], None)
        if fn is None or not callable(fn):
            raise ValueError(f"{s}: scikit-image has no sample image of that name")
        return as_float_rgb(fn(), name=s)
    p = pathlib.Path(s).expanduser()
    if p.is_dir():
        raise ValueError(f"{p} is a folder, not an image file (for a folder of photos: geomfit.reconstruct_many)")
    return as_float_rgb(decode_image(p), name=str(p))


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
