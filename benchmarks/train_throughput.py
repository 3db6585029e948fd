"""Training throughput: unet-edge's `train_one_epoch` with its real dataset and DataLoader, against a plain
PyTorch loop over the same model and data pre-loaded as tensors, in one process.

unet-edge runs as `fit` sets it up on the CPU: no loader workers, decoded images cached after the first
epoch, random flip and crop per image on uint8, normalisation once per batch (`BatchNormalize`), and the
model in the layout `prefers_channels_last(device, training=True)` picks (NCHW for CPU training, whose
channels_last BatchNorm is inaccurate; channels_last on CUDA). The plain loops never touch a file or a
transform: the textbook one (NCHW) is the bar to clear, and the same loop in channels_last shows what that
layout would give, so the gap to the faster plain loop is what data loading and the layout still cost. The
contenders alternate epoch by epoch so that load
from other processes hits them alike, and each reports the median.

    python benchmarks/train_throughput.py            # writes the `training` section of benchmarks/README.md

`--sweep 16,32,64,128` instead measures unet-edge alone at each batch size on `--device` (default: the one
`unet-edge train` would pick), set up as `fit` sets it up there (on CUDA: bf16/fp16 autocast, channels_last,
loader workers with pinned memory and non-blocking copies), and writes the `training-sweep` section:

    python benchmarks/train_throughput.py --sweep 16,32,64,128 --images 2048 --image-size 256 --base-channels 32 --depth 4
"""

from __future__ import annotations

import argparse
import copy
import functools
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import machine, write_section
from torch import nn

from unet_edge.data import ImageSegmentation
from unet_edge.device import mixed_precision, place_model, prefers_channels_last, resolve_device
from unet_edge.loaders import default_workers, make_loader
from unet_edge.model import ModelConfig, build_model
from unet_edge.synth import CLASSES, SynthSpec, write_synth
from unet_edge.train import train_one_epoch
from unet_edge.transforms import BatchNormalize, SegmentationPresetTrain

README = Path(__file__).with_name("README.md")
SECTION, SWEEP_SECTION = "training", "training-sweep"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="training images in the synthetic set")
    parser.add_argument("--image-size", type=int, default=64, help="side of the stored images and of the crop")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers for unet-edge (fit's CPU default: 0)"
    )
    parser.add_argument("--no-cache", action="store_true", help="decode every image every epoch (fit's default caches)")
    parser.add_argument("--rounds", type=int, default=7, help="timed epochs per contender (after one warm-up)")
    parser.add_argument(
        "--sweep", type=str, default=None, help="comma-separated batch sizes: unet-edge alone, images/s per size"
    )
    parser.add_argument("--device", default="auto", help="device of the sweep (auto: as `unet-edge train` picks)")
    parser.add_argument("--readme", type=Path, default=README, help="README whose training section is rewritten")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    return parser.parse_args()


def footer() -> list[str]:
    """The machine and the command line that produced a section."""
    command = shlex.join(["python", "benchmarks/train_throughput.py", *sys.argv[1:]])
    return ["", f"Machine: {machine()}.", "", "Command:", "", "```", command, "```"]


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


def plain_epoch(
    model: nn.Module, batches: list, optimizer: torch.optim.Optimizer, criterion: nn.Module, channels_last: bool
) -> int:
    """The textbook loop: forward, loss, backward, step, over batches already in memory."""
    model.train()
    seen = 0
    for index in torch.randperm(len(batches)).tolist():
        images, masks = batches[index]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
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


def sweep(args: argparse.Namespace) -> str:
    """images/s of `train_one_epoch` per batch size, configured as `fit` configures it on the device."""
    device = resolve_device(args.device)
    workers = args.workers if device.type == "cpu" else default_workers(device)[0]
    channels_last = prefers_channels_last(device, training=True)
    amp = mixed_precision(device, True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synth(
            Path(tmp) / "data", SynthSpec(num_train=args.images, num_val=1, size=args.image_size, seed=0)
        )
        dataset = ImageSegmentation(
            root, "train", SegmentationPresetTrain(crop_size=args.image_size, normalize=False), cache=not args.no_cache
        )
        if not args.no_cache:
            dataset.fill_cache()
        for batch_size in [int(b) for b in args.sweep.split(",")]:
            torch.manual_seed(0)
            loader = make_loader(
                dataset,
                batch_size=batch_size,
                shuffle=True,
                workers=workers,
                ignore_index=255,
                pin_memory=device.type == "cuda",
                drop_last=True,
            )
            model = place_model(
                build_model(ModelConfig(num_classes=len(CLASSES), base_channels=args.base_channels, depth=args.depth)),
                device,
                training=True,
            )
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            criterion = nn.CrossEntropyLoss(ignore_index=255)
            normalize = BatchNormalize(channels_last=channels_last)

            epoch = functools.partial(
                train_one_epoch,
                model,
                loader,
                optimizer,
                scheduler,
                criterion,
                device,
                autocast=amp.autocast,
                scaler=amp.scaler,
                normalize=normalize,
            )

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            epoch()  # warm-up: kernel selection, loader workers start
            rates, waits = [], []
            for _ in range(args.rounds):
                started = time.perf_counter()
                stats = epoch()
                elapsed = time.perf_counter() - started
                rates.append(stats.images / elapsed)
                waits.append(stats.data_time / elapsed)
            print(
                f"batch {batch_size}: {statistics.median(rates):.1f} images/s over {args.rounds} timed epochs",
                file=sys.stderr,
                flush=True,
            )
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if device.type == "cuda" else "-"
            rows.append(
                f"| {batch_size} | {statistics.median(rates):.1f} | {min(rates):.1f} | {max(rates):.1f} | "
                f"{100 * statistics.median(waits):.1f}% | {peak} |"
            )
            del model, optimizer, loader
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}.get(amp.dtype, "fp32")
    return "\n".join(
        [
            f"## Training throughput vs batch size ({device.type}: {name})",
            "",
            f"unet-edge `train_one_epoch` as `fit` runs it on {device.type}: {precision}, "
            f"{'channels_last, ' if channels_last else ''}{workers} loader workers"
            f"{', pinned memory, non-blocking copies' if device.type == 'cuda' else ''}, "
            f"{'decoded images cached' if not args.no_cache else 'decoding every epoch'}. UNetStudent base_channels "
            f"{args.base_channels}, depth {args.depth}, {args.image_size}x{args.image_size} crops, {args.images} synthetic "
            f"images, AdamW; {args.rounds} timed epochs per batch size after one warm-up.",
            "",
            "| batch | images/s (median) | min | max | waiting for data | peak GPU MiB |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            *footer(),
        ]
    )


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    if args.sweep:
        section = sweep(args)
        print(section)
        if not args.no_write:
            write_section(args.readme, SWEEP_SECTION, section)
        return
    device = torch.device("cpu")
    channels_last = prefers_channels_last(device, training=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synth(
            Path(tmp) / "data", SynthSpec(num_train=args.images, num_val=1, size=args.image_size, seed=0)
        )
        dataset = ImageSegmentation(
            root, "train", SegmentationPresetTrain(crop_size=args.image_size, normalize=False), cache=not args.no_cache
        )
        loader = make_loader(
            dataset, batch_size=args.batch_size, shuffle=True, workers=args.workers, ignore_index=255, drop_last=True
        )
        normalize = BatchNormalize(channels_last=channels_last)
        batches = preload(
            ImageSegmentation(root, "train", SegmentationPresetTrain(crop_size=args.image_size)), args.batch_size
        )

        initial = build_model(ModelConfig(num_classes=len(CLASSES), base_channels=args.base_channels, depth=args.depth))
        criterion = nn.CrossEntropyLoss(ignore_index=255)
        ours, plain, plain_cl = (copy.deepcopy(initial) for _ in range(3))
        if channels_last:
            ours.to(memory_format=torch.channels_last)
        plain_cl.to(memory_format=torch.channels_last)
        optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ours, plain, plain_cl)}
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizers[id(ours)], lambda step: 1.0)
        data_share: list[float] = []

        def ours_epoch() -> int:
            started = time.perf_counter()
            stats = train_one_epoch(
                ours, loader, optimizers[id(ours)], scheduler, criterion, device, normalize=normalize
            )
            data_share.append(stats.data_time / (time.perf_counter() - started))
            return stats.images

        def plain_loop() -> int:
            return plain_epoch(plain, batches, optimizers[id(plain)], criterion, channels_last=False)

        def plain_cl_loop() -> int:
            return plain_epoch(plain_cl, batches, optimizers[id(plain_cl)], criterion, channels_last=True)

        contenders = {
            f"unet-edge `train_one_epoch` (DataLoader, workers={args.workers}, "
            f"{'cached decode' if not args.no_cache else 'PNG decode every epoch'}, flip+crop per image, "
            f"normalise per batch{', channels_last' if channels_last else ''})": ours_epoch,
            "plain PyTorch loop, pre-loaded tensors, NCHW (textbook)": plain_loop,
            "plain PyTorch loop, pre-loaded tensors, channels_last (unet-edge's model layout)": plain_cl_loop,
        }
        for run_epoch in contenders.values():  # warm-up: allocator, oneDNN kernel selection, cache fill
            run_epoch()
        data_share.clear()
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        for round_index in range(args.rounds):
            for name, run_epoch in contenders.items():
                rates[name].append(timed(run_epoch))
            print(
                f"round {round_index + 1}/{args.rounds}: "
                + ", ".join(f"{v[-1]:.1f}" for v in rates.values())
                + " images/s",
                file=sys.stderr,
                flush=True,
            )

    ours_median, plain_median, ceiling_median = (statistics.median(values) for values in rates.values())
    waiting = statistics.median(data_share)
    lines = [
        "## Training throughput (CPU): unet-edge vs a plain PyTorch loop",
        "",
        f"UNetStudent base_channels {args.base_channels}, depth {args.depth}, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size} crops, {len(batches) * args.batch_size} synthetic training images per epoch, "
        f"AdamW, fp32; {args.rounds} timed epochs per loop, alternating, after one warm-up epoch each "
        "(unet-edge's warm-up epoch fills its decode cache).",
        "",
        "| loop | images/s (median) | min | max |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |" for name, v in rates.items()),
        "",
        f"unet-edge / textbook plain loop: **{ours_median / plain_median:.3f}**; "
        f"unet-edge / plain loop with the same model layout: {ours_median / ceiling_median:.3f}; "
        f"unet-edge waited for data {100 * waiting:.1f}% of its epoch time (median).",
        *footer(),
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(args.readme, SECTION, section)


if __name__ == "__main__":
    main()
