"""Training throughput: unet-edge's `train_one_epoch` with its real dataset and DataLoader, against a plain
PyTorch loop over the same model and data pre-loaded as tensors, in one process.

The plain loop never touches a file or a transform, so it is the ceiling for the model's step time on
this machine; if unet-edge gets close to it, data loading is not the bottleneck. The two contenders
alternate epoch by epoch so that load from other processes hits both alike, and each reports the median.

    python benchmarks/train_throughput.py            # writes the `training` section of benchmarks/README.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from unet_edge.data import ImageSegmentation
from unet_edge.io import atomic_write_text
from unet_edge.model import ModelConfig, build_model
from unet_edge.synth import CLASSES, SynthSpec, write_synth
from unet_edge.train import make_loader, train_one_epoch
from unet_edge.transforms import SegmentationPresetTrain

README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- BEGIN training -->", "<!-- END training -->"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="training images in the synthetic set")
    parser.add_argument("--image-size", type=int, default=64, help="side of the stored images and of the crop")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for unet-edge (fit's CPU default: 0)")
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per contender (after one warm-up)")
    parser.add_argument("--readme", type=Path, default=README, help="README whose training section is rewritten")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    return parser.parse_args()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} using {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def preload(dataset: ImageSegmentation, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample through the same train transform once, stacked into batches held in memory."""
    samples = [dataset[i] for i in range(len(dataset))]
    usable = len(samples) - len(samples) % batch_size
    return [
        (
            torch.stack([image.as_subclass(torch.Tensor) for image, _ in samples[start : start + batch_size]]),
            torch.stack([mask.as_subclass(torch.Tensor) for _, mask in samples[start : start + batch_size]]),
        )
        for start in range(0, usable, batch_size)
    ]


def plain_epoch(model: nn.Module, batches: list, optimizer: torch.optim.Optimizer, criterion: nn.Module) -> int:
    """The textbook loop: forward, loss, backward, step, over batches already in memory."""
    model.train()
    seen = 0
    for index in torch.randperm(len(batches)).tolist():
        images, masks = batches[index]
        loss = criterion(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += images.shape[0]
    return seen


def timed(run_epoch: Callable[[], int]) -> float:
    started = time.perf_counter()
    seen = run_epoch()
    return seen / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synth(Path(tmp) / "data", SynthSpec(num_train=args.images, num_val=1, size=args.image_size, seed=0))
        transform = SegmentationPresetTrain(crop_size=args.image_size)
        dataset = ImageSegmentation(root, "train", transform)
        loader = make_loader(dataset, batch_size=args.batch_size, shuffle=True, workers=args.workers, ignore_index=255, drop_last=True)
        batches = preload(dataset, args.batch_size)

        initial = build_model(ModelConfig(num_classes=len(CLASSES), base_channels=args.base_channels, depth=args.depth))
        criterion = nn.CrossEntropyLoss(ignore_index=255)
        ours, plain = copy.deepcopy(initial), copy.deepcopy(initial)
        ours_optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-3)
        plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(ours_optimizer, lambda step: 1.0)
        device = torch.device("cpu")

        def ours_epoch() -> int:
            return train_one_epoch(ours, loader, ours_optimizer, scheduler, criterion, device)[1]

        def plain_loop() -> int:
            return plain_epoch(plain, batches, plain_optimizer, criterion)

        ours_epoch(), plain_loop()  # warm-up: allocator, oneDNN kernel selection
        rates: dict[str, list[float]] = {
            f"unet-edge `train_one_epoch` (DataLoader, workers={args.workers}: PNG decode, augmentation)": [],
            "plain PyTorch loop (pre-loaded tensors)": [],
        }
        for _ in range(args.rounds):
            for values, run_epoch in zip(rates.values(), (ours_epoch, plain_loop)):
                values.append(timed(run_epoch))

    ours_median, plain_median = (statistics.median(values) for values in rates.values())
    lines = [
        BEGIN,
        "## Training throughput (CPU): unet-edge vs a plain PyTorch loop",
        "",
        f"UNetStudent base_channels {args.base_channels}, depth {args.depth}, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size} crops, {len(batches) * args.batch_size} synthetic training images per epoch, "
        f"AdamW, fp32; {args.rounds} timed epochs per loop, alternating, after one warm-up epoch each.",
        "",
        "| loop | images/s (median) | min | max |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |" for name, v in rates.items()),
        "",
        f"unet-edge / plain loop: **{ours_median / plain_median:.3f}**",
        "",
        f"Machine: {machine()}.",
        "",
        "Command:",
        "",
        "```",
        shlex.join(["python", "benchmarks/train_throughput.py", *sys.argv[1:]]),
        "```",
        END,
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(args.readme, section)


def write_section(readme: Path, section: str) -> None:
    """Replace only the text between the training markers (appending the section when it is absent)."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section + "\n"
    atomic_write_text(readme, text)


if __name__ == "__main__":
    main()
