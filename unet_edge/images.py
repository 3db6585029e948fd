"""Image and label file readers (numpy + Pillow only, so prediction on ONNX models starts without torch)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

__all__ = ["IMAGE_SUFFIXES", "LABEL_SUFFIXES", "load_image", "load_label"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read any image as H x W x 3 uint8 RGB (grayscale, RGBA and palette images are converted)."""
    try:
        with Image.open(path) as img:
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
        with Image.open(path) as img:
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
