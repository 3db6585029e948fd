"""Image and label file readers (numpy + Pillow only, so prediction on ONNX models starts without torch).

Every file is opened through `open_image`, which refuses an image above the pixel limit from its header,
before anything is decoded: a decompression bomb (a small PNG of 30000 x 30000 pixels) costs no memory.
The limit is `DEFAULT_MAX_PIXELS` unless UNET_EDGE_MAX_PIXELS (set by `unet-edge --max-pixels N`) raises it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "LABEL_SUFFIXES",
    "check_image",
    "load_image",
    "load_label",
    "max_pixels",
    "open_image",
    "preprocess",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
# 8192 x 8192: above any camera's frame (a 200 MP phone sensor is 16384 x 12288 and would need the option);
# decoding it takes 200 MB as RGB, the model's activations on it several GB.
DEFAULT_MAX_PIXELS = 8192 * 8192
MAX_PIXELS_ENV = "UNET_EDGE_MAX_PIXELS"


def max_pixels() -> int:
    """The largest width x height decoded: UNET_EDGE_MAX_PIXELS when set (a positive integer), else the default."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(f"{MAX_PIXELS_ENV}={text!r}: expected a positive number of pixels")
    return value


@contextmanager
def open_image(path: str | os.PathLike[str]) -> Iterator[Any]:
    """`PIL.Image.open(path)`, refused in one line when its header announces more pixels than `max_pixels()`."""
    limit = max_pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below says it in one line
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # Pillow's check would raise before ours
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with img:
        width, height = img.size
        if width * height > limit:
            raise DataError(
                f"{path}: {width} x {height} = {width * height:,} pixels is over the limit of {limit:,} pixels "
                f"(too large to decode safely); raise it with `unet-edge --max-pixels N ...` if the image is genuine"
            )
        yield img


def check_image(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) from the header of a readable image within the pixel limit; decodes nothing."""
    try:
        with open_image(path) as img:
            return img.size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read any image as H x W x 3 uint8 RGB (grayscale, RGBA and palette images are converted)."""
    try:
        with open_image(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(img, dtype=np.float64)
                peak = array.max() if array.size and array.max() > 0 else 1.0
                img = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8))
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None


def load_label(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label as H x W class indices (uint8 or, for 16-bit files, int32); palette indices are kept."""
    try:
        with open_image(path) as img:
            img.load()
            if img.mode in ("L", "P"):
                return np.asarray(img, dtype=np.uint8).copy()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(img, dtype=np.int32).copy()
            if img.mode == "1":
                return np.asarray(img, dtype=np.uint8).copy()
            raise DataError(f"{path}: label must be single-channel class indices, got image mode {img.mode}")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable label image ({exc.__class__.__name__}: {exc})") from None


def preprocess(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """H x W x 3 uint8 RGB -> 3 x H x W float32, scaled to [0, 1] then normalised (as at training)."""
    scaled = image.astype(np.float32) / 255.0
    normalised = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))
