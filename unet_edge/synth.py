"""The embedded default dataset: shapes on textured, noisy backgrounds, written in the folder layout.

Generation is deterministic: the same arguments give byte-identical files, so a run on the
embedded data is reproducible on any machine without downloading anything. Object borders
carry a thin band of the ignore index (255), as Pascal VOC's labels do.
"""

from __future__ import annotations

import colorsys
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .io import atomic_write_bytes, atomic_write_text
from .progress import Progress, tell

__all__ = ["CLASSES", "IGNORE_INDEX", "SynthSpec", "default_data_dir", "ensure_synth", "write_synth"]

CLASSES = ("background", "circle", "square", "triangle")
IGNORE_INDEX = 255
# 2: dataset.json says the classes are mirror-symmetric (the images and labels are those of version 1)
_FORMAT_VERSION = 2
NOISE = 1.0


@dataclass(frozen=True)
class SynthSpec:
    num_train: int = 512
    num_val: int = 64
    size: int = 64
    seed: int = 0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey gentle gradient with a fine woven texture; colour noise is added later, over the shapes too."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys + 1.0) / 2.0
    start = np.full(3, rng.uniform(40, 190), dtype=np.float32)
    end = np.clip(start + rng.uniform(-20, 20), 0, 255).astype(np.float32)
    image = start + ramp[..., None] * (end - start)
    frequency = rng.uniform(10, 16, size=2)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    texture = np.sin(2 * np.pi * frequency[0] * xs + phase[0]) * np.sin(2 * np.pi * frequency[1] * ys + phase[1])
    image += rng.uniform(4, 10) * texture[..., None]
    return image


def _shape_polygon(rng: np.random.Generator, kind: int, size: int) -> tuple[str, list[tuple[float, float]]]:
    radius = rng.uniform(0.12, 0.25) * size
    cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, size=2)
    if kind == 1:
        return "ellipse", [(cx - radius, cy - radius), (cx + radius, cy + radius)]
    if kind == 2:
        return "rectangle", [(cx - radius, cy - radius), (cx + radius, cy + radius)]
    turn = rng.uniform(-0.35, 0.35)
    points = [
        (cx + radius * 1.15 * np.sin(turn + k * 2 * np.pi / 3), cy - radius * 1.15 * np.cos(turn + k * 2 * np.pi / 3))
        for k in range(3)
    ]
    return "polygon", points


def _ignore_band(label: np.ndarray) -> np.ndarray:
    """Mark with the ignore index every pixel whose 4-neighbourhood holds another class."""
    border = np.zeros(label.shape, dtype=bool)
    border[1:, :] |= label[1:, :] != label[:-1, :]
    border[:-1, :] |= label[:-1, :] != label[1:, :]
    border[:, 1:] |= label[:, 1:] != label[:, :-1]
    border[:, :-1] |= label[:, :-1] != label[:, 1:]
    out = label.copy()
    out[border] = IGNORE_INDEX
    return out


def render_sample(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (H x W x 3 uint8) and its label (H x W uint8), a pure function of its arguments."""
    rng = np.random.default_rng([seed, index])
    image = _background(rng, size)
    label_img = Image.new("L", (size, size), 0)
    shape_mask_img = Image.new("L", (size, size), 0)
    label_draw = ImageDraw.Draw(label_img)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(1, len(CLASSES)))
        method, geometry = _shape_polygon(rng, kind, size)
        shape_mask_img.paste(0, (0, 0, size, size))
        getattr(ImageDraw.Draw(shape_mask_img), method)(geometry, fill=1)
        getattr(label_draw, method)(geometry, fill=kind)
        inside = np.asarray(shape_mask_img, dtype=bool)
        hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
        colour = np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32) * 255
        shade = rng.uniform(-20, 20) * np.linspace(-1, 1, size, dtype=np.float32)[None, :, None]
        image = np.where(inside[..., None], colour + shade, image)
    image += NOISE * rng.normal(0, rng.uniform(4, 12), size=image.shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, _ignore_band(np.asarray(label_img, dtype=np.uint8))


def _png_bytes(array: np.ndarray) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def write_synth(out: str | os.PathLike[str], spec: SynthSpec = SynthSpec(), progress: Progress | None = None) -> Path:
    """Write the dataset under `out` ({train,val}/{images,labels}, dataset.json) and return the root.

    `progress` hears `(done, total, "writing samples")` after every sample.
    """
    root = Path(out)
    total = spec.num_train + spec.num_val
    done = 0
    for split, count, offset in (("train", spec.num_train, 0), ("val", spec.num_val, 1_000_000)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = render_sample(spec.seed, offset + i, spec.size)
            atomic_write_bytes(root / split / "images" / f"{i:05d}.png", _png_bytes(image))
            atomic_write_bytes(root / split / "labels" / f"{i:05d}.png", _png_bytes(label))
            done += 1
            tell(progress, done, total, "writing samples")
    # Circles, squares and triangles are the same shapes mirrored, so `train` flips the images by default.
    meta = {
        "classes": list(CLASSES),
        "ignore_index": IGNORE_INDEX,
        "mirror_symmetric": True,
        "synth": asdict(spec),
        "version": _FORMAT_VERSION,
    }
    atomic_write_text(root / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return root


def default_data_dir(spec: SynthSpec = SynthSpec()) -> Path:
    """Where the embedded dataset is cached: $XDG_CACHE_HOME/unet-edge (~/.cache/unet-edge)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = f"synth-v{_FORMAT_VERSION}-n{spec.num_train}-{spec.num_val}-s{spec.size}-seed{spec.seed}"
    return cache / "unet-edge" / name


def ensure_synth(spec: SynthSpec = SynthSpec(), progress: Progress | None = None) -> Path:
    """Generate the embedded dataset once into the cache folder and return its root."""
    root = default_data_dir(spec)
    if (root / "dataset.json").is_file():
        return root
    staging = root.with_name(root.name + f".tmp{os.getpid()}")
    write_synth(staging, spec, progress)
    try:
        staging.rename(root)
    except OSError:
        if not (root / "dataset.json").is_file():
            raise
    return root
