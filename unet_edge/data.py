"""`ImageSegmentation`: images and label masks in one of two layouts, detected automatically.

Folder layout (pairs by file stem)::

    ROOT/{train,val}/images/*.{png,jpg,jpeg,bmp,tif,tiff}
    ROOT/{train,val}/labels/*.png       single-channel class indices, 255 = ignore
    ROOT/dataset.json                   optional: {"classes": [...], "ignore_index": 255}

Pascal VOC layout (e.g. VOCdevkit/VOC2012)::

    ROOT/ImageSets/Segmentation/{train,val}.txt   one image id per line
    ROOT/JPEGImages/<id>.jpg
    ROOT/SegmentationClass/<id>.png     palette PNG of class indices, 255 = ignore

Classes come from dataset.json. Without one, a folder that is Pascal VOC itself (named VOC2007,
VOC2012, ..., or labels using exactly the values 0..20) gets VOC's 21 names; any other dataset gets
one class per label value up to the largest found (``class_0``, ``class_1``, ...), and
`ScanReport.classes_note` says so in one line.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError

from .errors import DataError
from .images import IMAGE_SUFFIXES, LABEL_SUFFIXES, load_image, load_label, open_image, preprocess
from .progress import Progress, tell
from .synth import SynthSpec, ensure_synth

__all__ = [
    "IMAGE_SUFFIXES",
    "VOC_CLASSES",
    "DatasetInfo",
    "EvalImages",
    "ImageSegmentation",
    "ScanReport",
    "is_voc_dataset",
    "is_voc_root",
    "load_eval_images",
    "load_image",
    "load_label",
    "pad_collate",
    "read_dataset_info",
    "resolve_data",
    "scan_dataset",
]

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


VOC_SOURCE = "the Pascal VOC classes"
LABEL_VALUES = "the label values"


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset declares about itself (ROOT/dataset.json): its class names, ignore index and whether its
    classes look the same mirrored left-right (`mirror_symmetric`: shapes, textures, scenes; not characters)."""

    classes: tuple[str, ...]
    ignore_index: int | None
    mirror_symmetric: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_dataset_info(root: str | os.PathLike[str]) -> DatasetInfo | None:
    """Classes, ignore index and mirror symmetry from ROOT/dataset.json, or None when the file is absent."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f'{path}: "classes" must be a non-empty list of names')
    ignore_index = meta.get("ignore_index", 255)
    if ignore_index is not None and (
        isinstance(ignore_index, bool)
        or not isinstance(ignore_index, int)
        or not 0 <= ignore_index <= 255
        or ignore_index < len(classes)
    ):
        # 0..255: masks are single-channel 8-bit images, and crop padding is filled with the ignore index
        raise DataError(
            f'{path}: "ignore_index" must be null or an integer in 0..255 that is not a class id '
            f"(0..{len(classes) - 1}), got {json.dumps(ignore_index)}"
        )
    mirror_symmetric = meta.get("mirror_symmetric", False)
    if not isinstance(mirror_symmetric, bool):
        raise DataError(f'{path}: "mirror_symmetric" must be true or false, got {json.dumps(mirror_symmetric)}')
    return DatasetInfo(tuple(classes), ignore_index, mirror_symmetric)


def resolve_data(data: str | os.PathLike[str] | None, progress: Progress | None = None) -> Path:
    """The user's dataset folder, or the embedded synthetic set generated once into the cache."""
    if data is None:
        return ensure_synth(SynthSpec(), progress)
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    return root


def _files_by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
            if path.stem in found:
                raise DataError(f"{path}: two files share the stem {path.stem!r} ({found[path.stem].name})")
            found[path.stem] = path
    return found


def is_voc_dataset(root: str | os.PathLike[str]) -> bool:
    """True when `root` is Pascal VOC itself (a VOC-layout folder named VOC2007, VOC2012, ...), whose
    labels are VOC's 21 classes; other VOC-layout folders get their classes from dataset.json or their labels."""
    root = Path(root)
    return is_voc_root(root) and re.fullmatch(r"VOC20\d\d", root.resolve().name) is not None


def is_voc_root(root: str | os.PathLike[str]) -> bool:
    """True when `root` has the Pascal VOC segmentation folders (JPEGImages, SegmentationClass, ImageSets)."""
    root = Path(root)
    return all((root / sub).is_dir() for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"))


def _folder_samples(root: Path, split: str) -> list[tuple[Path, Path]]:
    image_dir, label_dir = root / split / "images", root / split / "labels"
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DataError(
                f"{folder}: folder not found (expected ROOT/{split}/images and ROOT/{split}/labels, "
                "or the Pascal VOC layout)"
            )
    images = _files_by_stem(image_dir, IMAGE_SUFFIXES)
    labels = _files_by_stem(label_dir, LABEL_SUFFIXES)
    missing_label = sorted(set(images) - set(labels))
    if missing_label:
        raise DataError(f"{images[missing_label[0]]}: image has no label in {label_dir} ({len(missing_label)} such)")
    missing_image = sorted(set(labels) - set(images))
    if missing_image:
        raise DataError(f"{labels[missing_image[0]]}: label has no image in {image_dir} ({len(missing_image)} such)")
    if not images:
        raise DataError(f"{image_dir}: split {split!r} is empty")
    return [(images[stem], labels[stem]) for stem in sorted(images)]


def _voc_samples(root: Path, split: str) -> list[tuple[Path, Path]]:
    """The pairs listed in ImageSets/Segmentation/<split>.txt, in the file's order."""
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    try:
        ids = [line.strip() for line in list_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise DataError(f"{list_file}: split list not found (Pascal VOC layout)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{list_file}: not a readable split list ({exc})") from None
    if not ids:
        raise DataError(f"{list_file}: split {split!r} is empty")
    samples = []
    for image_id in ids:
        image = root / "JPEGImages" / f"{image_id}.jpg"
        label = root / "SegmentationClass" / f"{image_id}.png"
        for path, what in ((image, "image"), (label, "label")):
            if not path.is_file():
                raise DataError(f"{path}: {what} of {image_id!r} (listed in {list_file.name}) not found")
        samples.append((image, label))
    return samples


class ImageSegmentation(torch.utils.data.Dataset):
    """Image/label pairs of one split, returned as ``(image, mask)`` after `transforms`.

    Without transforms, `image` is a uint8 `tv_tensors.Image` (3 x H x W) and `mask` an int64
    `tv_tensors.Mask` (H x W). The Pascal VOC layout is recognised by its folders, otherwise the
    folder layout is used, paired by file stem; a missing partner is an error, not a skip.

    With ``cache=True`` each pair is decoded once and kept in memory as uint8 (labels as stored), so
    later epochs only augment; `fill_cache` decodes them all up front (before DataLoader workers fork,
    so they share one copy). `ScanReport.decoded_bytes` estimates what the cache will hold.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        transforms: Callable[..., tuple[Any, ...]] | None = None,
        *,
        cache: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.cache = cache
        self._decoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset folder not found")
        self.layout = "voc" if is_voc_root(self.root) else "folder"
        if self.layout == "voc":
            self.samples = _voc_samples(self.root, split)
        else:
            self.samples = _folder_samples(self.root, split)
        self.info = read_dataset_info(self.root) or (
            DatasetInfo(VOC_CLASSES, 255) if is_voc_dataset(self.root) else None
        )

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.samples[index]
        image = load_image(image_path)
        label = load_label(label_path)
        if image.shape[:2] != label.shape:
            raise DataError(
                f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(label)

    def load(self, index: int) -> tuple[Any, Any]:
        """The decoded pair, before transforms, as a uint8 `tv_tensors.Image` and a `tv_tensors.Mask` in
        the label's stored dtype (uint8 or int32)."""
        from torchvision import tv_tensors  # imported on first use: scanning and error paths do without it

        pair = self._decoded.get(index) if self.cache else None
        if pair is None:
            pair = self._decode(index)
            if self.cache:
                self._decoded[index] = pair
        return tv_tensors.Image(pair[0]), tv_tensors.Mask(pair[1])

    def fill_cache(self, threads: int | None = None) -> None:
        """Decode every pair into the cache now (PIL releases the GIL, so threads decode in parallel)."""
        from concurrent.futures import ThreadPoolExecutor

        self.cache = True
        missing = [i for i in range(len(self)) if i not in self._decoded]
        with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
            for index, pair in zip(missing, pool.map(self._decode, missing)):
                self._decoded[index] = pair

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, mask = self.load(index)
        if self.transforms is not None:
            return self.transforms(image, mask)
        return image, type(mask)(mask.to(torch.int64))


@dataclass
class ScanReport:
    """What `scan_dataset` found: image pairs per split, pixels per label value, and the classes to use."""

    root: Path
    layout: str
    info: DatasetInfo
    info_source: str
    images: dict[str, int] = field(default_factory=dict)
    label_pixels: dict[int, int] = field(default_factory=dict)
    pixels: dict[str, int] = field(default_factory=dict)

    @property
    def classes_note(self) -> str | None:
        """One line saying which classes were assumed and how to name them, when no dataset.json gave them."""
        if (self.root / "dataset.json").is_file() or self.info_source not in (LABEL_VALUES, VOC_SOURCE):
            return None
        count = self.info.num_classes
        if self.info_source == VOC_SOURCE:
            assumed = f"the {count} Pascal VOC classes ({self.info.classes[0]} .. {self.info.classes[-1]})"
        else:
            assumed = f"{count} classes (class_0 .. class_{count - 1}), one per label value up to the largest found"
        example = json.dumps({"classes": [*list(self.info.classes[:2]), "..."], "ignore_index": self.info.ignore_index})
        target = self.root / "dataset.json"
        return f"{self.root}: no dataset.json, so assuming {assumed}; to set the classes, write {target} like {example}"

    def decoded_bytes(self, split: str) -> int:
        """Memory that `ImageSegmentation(cache=True)` needs for `split`: 3 bytes of image + 1 of label per pixel."""
        return 4 * self.pixels.get(split, 0)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, after checking that the file is complete.

    PNG chunks are checked without decompressing; JPEG is decoded at 1/8 scale, enough to hit a
    truncated stream; other formats are decoded.
    """
    try:
        with open_image(path) as img:
            size = img.size
            if img.format == "PNG":
                img.verify()
            else:
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                img.load()
        return size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None


def _bad_values(label_path: Path, values: np.ndarray, counts: np.ndarray, info: DatasetInfo, source: str) -> str | None:
    """A message for label values that are neither a class id nor the ignore index, or None."""
    bad = [
        (int(v), int(c)) for v, c in zip(values, counts) if not (0 <= v < info.num_classes or v == info.ignore_index)
    ]
    if not bad:
        return None
    value, count = max(bad, key=lambda vc: vc[1])
    others = sorted(v for v, _ in bad if v != value)
    also = f" (also values {', '.join(map(str, others[:5]))}{', ...' if len(others) > 5 else ''})" if others else ""
    return (
        f"{label_path}: {count} pixels have value {value}, neither a class id (0..{info.num_classes - 1}, from "
        f"{source}) nor the ignore index {info.ignore_index}{also}"
    )


def scan_dataset(
    root: str | os.PathLike[str],
    splits: Sequence[str] = ("train", "val"),
    info: DatasetInfo | None = None,
    *,
    info_source: str = "the given classes",
    progress: Progress | None = None,
) -> ScanReport:
    """Check every image/label pair of `splits` before any time is spent training or evaluating.

    Finds missing folders, empty splits, unpaired files, truncated or non-image files, labels whose
    size differs from their image, and label values that are neither a class id nor the ignore index
    (classes from `info`, else dataset.json, else the VOC classes for Pascal VOC itself; without any,
    one class per label value up to the largest, or VOC's 21 for a VOC layout whose labels are exactly
    0..20). Raises `DataError` naming the first bad file and how many more there are.
    """
    root = Path(root)
    datasets = [ImageSegmentation(root, split) for split in splits]
    declared, source = info, info_source
    if declared is None and datasets[0].info is not None:
        declared = datasets[0].info
        source = str(root / "dataset.json") if (root / "dataset.json").is_file() else VOC_SOURCE
    problems: list[str] = []
    pixels: Counter[int] = Counter()
    total = sum(len(dataset) for dataset in datasets)
    done = 0
    split_pixels: Counter[str] = Counter()
    for dataset in datasets:
        for image_path, label_path in dataset.samples:
            done += 1
            tell(progress, done, total, "checking data")
            try:
                width, height = _image_size(image_path)
                label = load_label(label_path)
            except DataError as exc:
                problems.append(str(exc))
                continue
            split_pixels[dataset.split] += width * height
            if label.shape != (height, width):
                problems.append(
                    f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but its image {image_path.name} is "
                    f"{width}x{height}"
                )
            values, counts = np.unique(label, return_counts=True)
            message = _bad_values(label_path, values, counts, declared, source) if declared is not None else None
            if message:
                problems.append(message)
            pixels.update(dict(zip(values.tolist(), counts.tolist())))
    if problems:
        more = (
            f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''} in this dataset)"
            if len(problems) > 1
            else ""
        )
        raise DataError(problems[0] + more)
    if declared is None:
        seen = sorted(value for value in pixels if value != 255)
        if datasets[0].layout == "voc" and seen == list(range(len(VOC_CLASSES))):
            declared, source = DatasetInfo(VOC_CLASSES, 255), VOC_SOURCE
        else:
            largest = seen[-1] if seen else 0
            declared, source = DatasetInfo(tuple(f"class_{i}" for i in range(largest + 1)), 255), LABEL_VALUES
    return ScanReport(
        root,
        datasets[0].layout,
        declared,
        source,
        {d.split: len(d) for d in datasets},
        dict(sorted(pixels.items())),
        {d.split: split_pixels[d.split] for d in datasets},
    )


def pad_collate(batch: Sequence[tuple[torch.Tensor, ...]], ignore_index: int = 255) -> tuple[torch.Tensor, ...]:
    """Stack samples of different sizes: images padded with 0, masks with `ignore_index` (so ignored).

    Images keep their dtype (uint8 from an un-normalised preset, float32 otherwise); masks become int64.
    Samples may carry more per-pixel maps after the mask (C x H x W, such as a teacher's logits): each is
    stacked the same way, padded with 0.

    The batch is plain tensors: copying into tv_tensors would dispatch every copy through their
    `__torch_function__`, which made collation cost twice the decoding and augmentation.
    """
    plain = [tuple(part.as_subclass(torch.Tensor) for part in sample) for sample in batch]
    height = max(sample[0].shape[-2] for sample in plain)
    width = max(sample[0].shape[-1] for sample in plain)
    first = plain[0]
    images = first[0].new_zeros((len(plain), first[0].shape[0], height, width))
    masks = torch.full((len(plain), height, width), ignore_index, dtype=torch.int64)
    extras = [part.new_zeros((len(plain), part.shape[0], height, width)) for part in first[2:]]
    for i, (image, mask, *rest) in enumerate(plain):
        images[i, :, : image.shape[-2], : image.shape[-1]] = image
        masks[i, : mask.shape[-2], : mask.shape[-1]] = mask
        for stacked, part in zip(extras, rest, strict=True):
            stacked[i, :, : part.shape[-2], : part.shape[-1]] = part
    return (images, masks, *extras)


@dataclass
class EvalImages:
    """Validation images (raw uint8 HWC and normalised CHW) with their ground-truth masks."""

    raw: list[np.ndarray]
    normalised: list[np.ndarray]
    masks: list[np.ndarray]
    paths: list[Path]


def load_eval_images(
    root: str | os.PathLike[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    split: str = "val",
    num_images: int = 16,
) -> EvalImages:
    """The first `num_images` images of a split (all of them when `num_images` <= 0)."""
    dataset = ImageSegmentation(root, split)
    samples = dataset.samples if num_images <= 0 else dataset.samples[:num_images]
    raw, normalised, masks, paths = [], [], [], []
    for image_path, label_path in samples:
        image = load_image(image_path)
        label = load_label(label_path)
        raw.append(image)
        normalised.append(preprocess(image, mean, std))
        masks.append(label.astype(np.int64))
        paths.append(image_path)
    return EvalImages(raw, normalised, masks, paths)
