"""Segment images with any model unet-edge opens (checkpoint, TorchScript, ONNX, end-to-end ONNX).

For each image it writes what a person looks at and a program reads: a palette PNG class mask of the
image's own size (pixel value = class index, colours from the palette), an overlay of the mask
blended over the image with a legend, and on request a JSON of per-class pixel areas. Images are
read one at a time and batched only with neighbours of the same size, so a folder of any size and
of mixed sizes streams through in bounded memory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .artifact import single_artifact
from .backends import open_backend
from .errors import ArtifactError, DataError
from .formats import Backend, Provider
from .images import IMAGE_SUFFIXES, check_image, load_image
from .io import atomic_path, atomic_write_text
from .progress import Progress, tell

__all__ = ["Prediction", "class_areas", "class_palette", "collect_images", "overlay_image", "predict", "save_mask"]

OVERLAY_ALPHA = 0.5
# Overlays of small images are enlarged (nearest neighbour, integer factor) so the legend stays readable.
MIN_OVERLAY_SIDE = 256
LEGEND_FONT_PX = 14


@dataclass
class Prediction:
    """The files written for one image and its per-class pixel counts."""

    image: Path
    mask: Path
    overlay: Path | None
    stats: Path | None
    areas: dict[str, int] = field(default_factory=dict)


def class_palette(num_classes: int) -> np.ndarray:
    """K x 3 uint8 colours: Pascal VOC's colour map (class 0 black, then well-separated colours)."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for index in range(num_classes):
        value, colour = index, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette[index] = colour
    return palette


def collect_images(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Image files given directly or found (non-recursively, in name order) in given folders."""
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p
                for p in item.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
            if not found:
                raise DataError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            images += found
        elif item.is_file():
            images.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen and seen[path.stem] != path:
            raise DataError(
                f"{path}: same name as {seen[path.stem]}; their outputs would overwrite each other (predict them into "
                f"separate --out folders)"
            )
        seen[path.stem] = path
    return list(dict.fromkeys(images))


def save_mask(path: Path, mask: np.ndarray, palette: np.ndarray) -> None:
    """Write H x W class indices as a palette PNG (viewers show colours, readers get the indices)."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def class_areas(mask: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    """Pixels per class name (every class listed, zero included)."""
    counts = np.bincount(mask.reshape(-1), minlength=len(classes))
    return {name: int(count) for name, count in zip(classes, counts)}


def overlay_image(
    image: np.ndarray, mask: np.ndarray, classes: Sequence[str], palette: np.ndarray, alpha: float = OVERLAY_ALPHA
) -> Image.Image:
    """The mask's colours blended over the image, with a legend (colour, class name, share of pixels) on the right."""
    blended = (
        (image.astype(np.float32) * (1 - alpha) + palette[mask].astype(np.float32) * alpha).round().astype(np.uint8)
    )
    height, width = mask.shape
    scale = max(1, math.ceil(MIN_OVERLAY_SIDE / max(height, width)))
    picture = Image.fromarray(blended).resize((width * scale, height * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=LEGEND_FONT_PX)
    areas = class_areas(mask, classes)
    labels = [f"{name} {100 * areas[name] / mask.size:.1f}%" for name in classes]
    row, swatch, pad = LEGEND_FONT_PX + 8, LEGEND_FONT_PX, 8
    text_width = max(int(font.getlength(label)) for label in labels)
    legend_width = pad + swatch + pad + text_width + pad
    canvas = Image.new("RGB", (picture.width + legend_width, max(picture.height, pad + row * len(classes))), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, label in enumerate(labels):
        x, y = picture.width + pad, pad + index * row
        draw.rectangle((x, y, x + swatch, y + swatch), fill=tuple(int(c) for c in palette[index]), outline="black")
        draw.text((x + swatch + pad, y + swatch / 2), label, fill="black", font=font, anchor="lm")
    return canvas


def _same_size_batches(paths: Sequence[Path], batch_size: int) -> Iterator[list[tuple[Path, np.ndarray]]]:
    """Consecutive images of one size, at most `batch_size` at a time, loaded as they are needed."""
    batch: list[tuple[Path, np.ndarray]] = []
    for path in paths:
        image = load_image(path)
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((path, image))
    if batch:
        yield batch


def predict(
    model: str | os.PathLike[str] | Backend,
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    overlay: bool = True,
    stats: bool = False,
    provider: Provider | str = Provider.CPU,
    batch_size: int = 8,
    limit: int | None = None,
    progress: Progress | None = None,
) -> list[Prediction]:
    """Segment every image in `inputs` (files or folders) and write `<stem>_mask.png`, `<stem>_overlay.png`
    and, with `stats`, `<stem>_stats.json` into `out`. `limit` keeps the first images only."""
    paths = collect_images(inputs)[:limit]
    if not isinstance(model, Backend) and Path(model).is_dir():
        model = single_artifact(model)
    backend = model if isinstance(model, Backend) else open_backend(model, provider)
    for (
        path
    ) in paths:  # headers only: an unreadable image, or one too large to decode, is refused before anything is written
        check_image(path)
    palette = class_palette(backend.num_classes)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    results: list[Prediction] = []
    for batch in _same_size_batches(paths, batch_size):
        masks = backend.segment(np.stack([image for _, image in batch]))
        for (path, image), mask in zip(batch, masks):
            if mask.shape != image.shape[:2]:
                raise ArtifactError(
                    f"{backend.path}: returned a {mask.shape[1]}x{mask.shape[0]} mask for the "
                    f"{image.shape[1]}x{image.shape[0]} image {path}"
                )
            result = Prediction(path, folder / f"{path.stem}_mask.png", None, None, class_areas(mask, backend.classes))
            save_mask(result.mask, mask, palette)
            if overlay:
                result.overlay = folder / f"{path.stem}_overlay.png"
                with atomic_path(result.overlay) as tmp:
                    overlay_image(image, mask, backend.classes, palette).save(tmp, format="PNG")
            if stats:
                result.stats = folder / f"{path.stem}_stats.json"
                report = {
                    "image": str(path),
                    "model": str(backend.path),
                    "width": int(mask.shape[1]),
                    "height": int(mask.shape[0]),
                    "classes": {
                        name: {"pixels": count, "fraction": count / mask.size} for name, count in result.areas.items()
                    },
                }
                atomic_write_text(result.stats, json.dumps(report, indent=2) + "\n")
            results.append(result)
            tell(progress, len(results), len(paths), f"predicted {path.name}")
    return results
