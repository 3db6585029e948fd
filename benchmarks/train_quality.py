"""Training quality: best val mIoU of unet-edge's `fit` (the recipe a user gets by default) against a plain
PyTorch loop, on several datasets and seeds.

Both train the same `UNetStudent` for the same epochs and batch size with the same schedule (AdamW,
weight decay, 5 % linear warm-up then cosine decay per step) and are validated after every epoch with
the same metric (one confusion matrix over every val pixel, each image at its own size). The plain loop
is the textbook one: tensors pre-loaded in memory (each training image cropped or padded to the crop
size once), no augmentation, cross-entropy loss, shuffled batches, the last partial batch dropped as `fit`
drops it. `fit` runs with every default (loss, augmentation, learning rate) a user gets. For each seed the
plain loop starts from the initial weights `fit` draws and visits the batches in `fit`'s order, so the two
differ in recipe, not in the luck of the draw.

Datasets (written to a temporary folder; nothing is downloaded):

- shapes: unet-edge's embedded synthetic set (folder layout, dataset.json);
- digits: real handwritten digits (scikit-learn's `load_digits`, 1797 scans of 8x8) upsampled and
  composed into 64x64 scenes, label = digit + 1 on the stroke, Pascal VOC layout without dataset.json;
  val scenes use digits that no training scene uses;
- textures: Voronoi mosaics of real photographed textures shipped with scikit-image (brick, grass,
  gravel, the lunar surface), images of mixed sizes (48-96 px), label = texture; val crops come from
  parts of the photographs that training never sees.

shapes and textures declare their classes mirror-symmetric in dataset.json, so `fit` flips their training
images by default; digits (no dataset.json) are not flipped.

    python benchmarks/train_quality.py               # writes the `train-quality` section of benchmarks/README.md

Runs go `--jobs` at a time, one thread each, so the figures do not depend on how busy the machine is
(only the wall time does).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import README, machine, write_section
from PIL import Image

SECTION = "train-quality"
DIGIT_CLASSES = ("background", *(f"digit_{d}" for d in range(10)))
TEXTURES = ("moon", "brick", "grass", "gravel")
IGNORE = 255


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", default="shapes,digits,textures", help="comma-separated: shapes, digits, textures"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument(
        "--fit", default="{}", help="JSON of TrainConfig fields for `fit` beyond its defaults, e.g. '{\"hflip\": 0}'"
    )
    parser.add_argument(
        "--loops", default="fit,plain", help="comma-separated: fit, plain (e.g. fit alone to try a --fit variant)"
    )
    parser.add_argument("--base-channels", type=int, default=16, help="width of the UNetStudent both loops train")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate of both loops (default: the one `fit` picks)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    parser.add_argument("--readme", type=Path, default=README, help="README whose train-quality section is rewritten")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    return parser.parse_args()


def _ignore_border(label: np.ndarray) -> np.ndarray:
    """The label with every pixel whose 4-neighbourhood holds another label set to the ignore index."""
    border = np.zeros(label.shape, dtype=bool)
    border[1:, :] |= label[1:, :] != label[:-1, :]
    border[:-1, :] |= label[:-1, :] != label[1:, :]
    border[:, 1:] |= label[:, 1:] != label[:, :-1]
    border[:, :-1] |= label[:, :-1] != label[:, 1:]
    return np.where(border, IGNORE, label).astype(np.uint8)


def digit_scene(
    rng: np.random.Generator, digits: np.ndarray, targets: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One RGB scene with up to four digits (one per quadrant, random size and place) and its label.

    Ink is blended by the digit's grey level; pixels at half the peak level or more are the digit's
    class, the faint rim between a fifth and two fifths is ignored (255), the rest is background.
    """
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    angle = rng.uniform(0, 2 * np.pi)
    paper = rng.uniform(150, 230, size=3).astype(np.float32)
    image = paper + rng.uniform(-40, 40) * ((np.cos(angle) * xs + np.sin(angle) * ys + 1) / 2)[..., None]
    label = np.zeros((size, size), dtype=np.uint8)
    cell = size // 2
    for row, col in ((0, 0), (0, 1), (1, 0), (1, 1)):
        if rng.uniform() < 0.2:
            continue
        side = int(rng.integers(cell * 3 // 4, cell + 1))
        top = row * cell + int(rng.integers(0, cell - side + 1))
        left = col * cell + int(rng.integers(0, cell - side + 1))
        window = (slice(top, top + side), slice(left, left + side))
        pick = int(rng.integers(len(digits)))
        scan = Image.fromarray((digits[pick] * (255 / 16)).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        glyph = np.asarray(scan, dtype=np.float32) / 255
        ink = np.clip(paper - rng.uniform(90, 140), 0, 255)
        alpha = np.clip(glyph * 1.6, 0, 1)[..., None]
        image[window] = image[window] * (1 - alpha) + ink * alpha
        label[window] = np.where(glyph >= 0.4, targets[pick] + 1, np.where(glyph >= 0.2, IGNORE, label[window]))
    image += rng.normal(0, rng.uniform(4, 14), size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def write_digits(root: Path, num_train: int, num_val: int, size: int = 64, seed: int = 0) -> Path:
    """Digit scenes in the Pascal VOC layout (JPEG images, palette labels, split lists), no dataset.json.

    A fifth of the 1797 digits (chosen at random) are held out for the val scenes.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    pools = {"train": order[len(order) // 5 :], "val": order[: len(order) // 5]}
    palette = [channel for i in range(256) for channel in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        pool = pools[split]
        ids = [f"{split}_{i:05d}" for i in range(count)]
        for image_id in ids:
            image, label = digit_scene(rng, digits.images[pool], digits.target[pool], size)
            Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            mask = Image.frombytes("P", (size, size), label.tobytes())
            mask.putpalette(palette)
            mask.save(root / "SegmentationClass" / f"{image_id}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def texture_mosaic(
    rng: np.random.Generator, textures: list[np.ndarray], height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """A Voronoi mosaic of 2-5 cells, each a crop of one texture with random contrast and brightness."""
    centres = rng.uniform(0, 1, size=(int(rng.integers(2, 6)), 2)) * [height, width]
    ys, xs = np.mgrid[0:height, 0:width]
    owner = ((ys[None] - centres[:, 0, None, None]) ** 2 + (xs[None] - centres[:, 1, None, None]) ** 2).argmin(0)
    kinds = rng.integers(0, len(textures), size=len(centres))
    image = np.zeros((height, width), dtype=np.float32)
    for cell, kind in enumerate(kinds):
        texture = textures[kind]
        top = int(rng.integers(0, texture.shape[0] - height + 1))
        left = int(rng.integers(0, texture.shape[1] - width + 1))
        patch = texture[top : top + height, left : left + width]
        image = np.where(owner == cell, (patch - patch.mean()) * rng.uniform(0.7, 1.3) + rng.uniform(90, 160), image)
    image += rng.normal(0, 4, size=image.shape).astype(np.float32)
    grey = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2), _ignore_border(kinds[owner].astype(np.uint8))


def write_textures(root: Path, num_train: int, num_val: int, sizes: tuple[int, int] = (48, 96), seed: int = 0) -> Path:
    """Texture mosaics in the folder layout with a dataset.json; train crops from the left 60 % of each
    photograph, val crops from the rest."""
    from skimage import data

    photos = [np.asarray(getattr(data, name)(), dtype=np.float32) for name in TEXTURES]
    split_at = int(min(photo.shape[1] for photo in photos) * 0.6)
    parts = {"train": [p[:, :split_at] for p in photos], "val": [p[:, split_at:] for p in photos]}
    for split, count in (("train", num_train), ("val", num_val)):
        rng = np.random.default_rng([seed, 2 if split == "train" else 3])
        for sub in ("images", "labels"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            height, width = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
            image, label = texture_mosaic(rng, parts[split], height, width)
            Image.fromarray(image).save(root / split / "images" / f"{i:05d}.png")
            Image.fromarray(label).save(root / split / "labels" / f"{i:05d}.png")
    # Brick, grass, gravel and the lunar surface are the same textures mirrored: `train` flips them by default.
    meta = {"classes": list(TEXTURES), "ignore_index": IGNORE, "mirror_symmetric": True}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def write_datasets(names: list[str], out: Path, num_train: int, num_val: int) -> dict[str, Path]:
    from unet_edge.synth import SynthSpec, write_synth

    writers = {
        "shapes": lambda root: write_synth(root, SynthSpec(num_train=num_train, num_val=num_val)),
        "digits": lambda root: write_digits(root, num_train, num_val),
        "textures": lambda root: write_textures(root, num_train, num_val),
    }
    unknown = sorted(set(names) - set(writers))
    if unknown:
        raise SystemExit(f"error: unknown dataset {', '.join(unknown)} (choose from {', '.join(writers)})")
    return {name: writers[name](out / name) for name in names}


def run_fit(root: Path, seed: int, epochs: int, batch_size: int, overrides: dict) -> list[float]:
    """Val mIoU per epoch of `fit` with its defaults (plus `overrides`)."""
    import torch

    from unet_edge.config import TrainConfig
    from unet_edge.train import fit

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(data=str(root), epochs=epochs, batch_size=batch_size, device="cpu", seed=seed, out=out)
        result = fit(replace(config, **overrides))
    return [record["miou"] for record in result.history]


def run_plain(root: Path, seed: int, epochs: int, batch_size: int, overrides: dict, crop: int = 64) -> list[float]:
    """Val mIoU per epoch of the textbook loop over pre-loaded tensors, same model, optimiser and schedule."""
    import torch
    import torch.nn.functional as F

    from unet_edge.config import TrainConfig
    from unet_edge.data import ImageSegmentation
    from unet_edge.evaluate import evaluate
    from unet_edge.loaders import training_data
    from unet_edge.model import build_model
    from unet_edge.train import WarmupCosine
    from unet_edge.transforms import BatchNormalize

    torch.set_num_threads(1)
    defaults = replace(TrainConfig(), **{k: v for k, v in overrides.items() if k in ("model", "lr")})
    # The random draws `fit` makes for this seed, so that the two loops differ in their recipe and not in luck:
    # the initial weights (seeded as `fit` seeds, drawn after building its loaders, as `fit` draws them; loading
    # the tensors below draws nothing) and the batch order (a loader over indices whose generator is seeded as
    # `fit`'s train loader's). The loaders themselves are not used; their scan gives the dataset's classes.
    random.seed(seed)
    torch.manual_seed(seed)
    info = training_data(
        TrainConfig(data=str(root), batch_size=batch_size, device="cpu", seed=seed), torch.device("cpu")
    ).scan.info
    ignore = IGNORE if info.ignore_index is None else info.ignore_index

    def fixed_crop(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad_h, pad_w = max(crop - image.shape[-2], 0), max(crop - image.shape[-1], 0)
        image = F.pad(image, (0, pad_w, 0, pad_h))[:, :crop, :crop]
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=ignore)[:crop, :crop]
        return image, mask

    train = [fixed_crop(*(t.as_subclass(torch.Tensor) for t in pair)) for pair in ImageSegmentation(root, "train")]
    normalize = BatchNormalize()
    images = normalize(torch.stack([image for image, _ in train]))
    masks = torch.stack([mask for _, mask in train]).long()
    val_batches = [
        ([image.as_subclass(torch.Tensor)], [mask.as_subclass(torch.Tensor)])
        for image, mask in ImageSegmentation(root, "val")
    ]
    model = build_model(replace(defaults.model, num_classes=info.num_classes))
    order = torch.utils.data.DataLoader(
        range(len(train)),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=defaults.peak_lr, weight_decay=defaults.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(len(order) * epochs, defaults.warmup_fraction)
    )
    criterion = torch.nn.CrossEntropyLoss(ignore_index=ignore)
    curve = []
    for _ in range(epochs):
        model.train()
        for index in order:
            loss = criterion(model(images[index]), masks[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        curve.append(
            evaluate(
                model, val_batches, info.num_classes, info.ignore_index, torch.device("cpu"), normalize=normalize
            ).miou
        )
    return curve


def run(job: tuple[str, str, Path, int, int, int, dict]) -> tuple[str, str, int, list[float], float]:
    dataset, loop, root, seed, epochs, batch_size, overrides = job
    started = time.perf_counter()
    curve = (
        run_fit(root, seed, epochs, batch_size, overrides)
        if loop == "fit"
        else run_plain(root, seed, epochs, batch_size, overrides)
    )
    return dataset, loop, seed, curve, time.perf_counter() - started


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def section(results: list[tuple[str, str, int, list[float], float]], args: argparse.Namespace, overrides: dict) -> str:
    from unet_edge.config import TrainConfig

    defaults = replace(TrainConfig(), model=overrides["model"], lr=overrides["lr"])
    extra = {k: v for k, v in overrides.items() if k not in ("model", "lr")}
    fit_label = "unet-edge `fit`, defaults" + (f" + {json.dumps(extra)}" if extra else "")
    labels = {"fit": fit_label, "plain": "plain loop, pre-loaded tensors, no augmentation, cross-entropy"}
    lines = [
        "## Training quality: `fit` vs a plain PyTorch loop",
        "",
        f"UNetStudent base {defaults.model.base_channels}, depth {defaults.model.depth}; {args.epochs} epochs, batch "
        f"{args.batch_size}, 64x64 crops, AdamW lr {defaults.peak_lr:g} "
        f"wd {defaults.weight_decay:g}, {defaults.warmup_fraction:.0%} warm-up + cosine per step, for both; `fit` with its default "
        f"loss ({defaults.loss}), the plain loop with cross-entropy; {args.train_images} train / {args.val_images} val images per dataset; "
        f"seeds {args.first_seed}..{args.first_seed + args.seeds - 1}. Best val mIoU over the epochs (mean ± standard deviation over seeds), "
        "the mIoU of the last epoch, and each seed's best.",
        "",
        "| dataset | loop | best val mIoU | last-epoch mIoU | per seed (best) |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for dataset in args.datasets.split(","):
        for loop in args.loops.split(","):
            runs = sorted((r for r in results if r[0] == dataset and r[1] == loop), key=lambda r: r[2])
            best = [max(r[3]) for r in runs]
            last = [r[3][-1] for r in runs]
            lines.append(
                f"| {dataset} | {labels[loop]} | {summary(best)} | {summary(last)} | {', '.join(f'{b:.3f}' for b in best)} |"
            )
    minutes = sum(r[4] for r in results) / 60
    command = shlex.join(["python", "benchmarks/train_quality.py", *sys.argv[1:]])
    lines += [
        "",
        f"{len(results)} runs, {minutes:.0f} CPU-thread minutes in all.",
        "",
        f"Machine: {machine()}.",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
    ]
    return "\n".join(lines)


def main() -> None:
    import torch

    torch.set_num_threads(1)  # as in every run, so the machine line below says what the runs used
    args = parse_args()
    from dataclasses import replace as replaced

    from unet_edge.config import TrainConfig

    model = replaced(TrainConfig().model, base_channels=args.base_channels, depth=args.depth)
    overrides = {"model": model, "lr": args.lr, **json.loads(args.fit)}
    names = args.datasets.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        roots = write_datasets(names, Path(tmp), args.train_images, args.val_images)
        jobs = [
            (name, loop, roots[name], seed, args.epochs, args.batch_size, overrides)
            for seed in range(args.first_seed, args.first_seed + args.seeds)
            for name in names
            for loop in args.loops.split(",")
        ]
        results = []
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for result in pool.map(run, jobs):
                dataset, loop, seed, curve, seconds = result
                print(
                    f"{dataset:9s} {loop:6s} seed {seed}: best {max(curve):.4f} last {curve[-1]:.4f} ({seconds:.0f} s)",
                    flush=True,
                )
                results.append(result)
    text = section(results, args, overrides)
    print(text)
    if not args.no_write:
        write_section(args.readme, SECTION, text)


if __name__ == "__main__":
    main()
