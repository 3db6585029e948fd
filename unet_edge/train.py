"""Training as plain functions: `train_one_epoch`, `evaluate`, and `fit`, which ties them to a run folder.

Device and precision are decided once (`resolve_device`, `autocast_context`); the library reports
progress through `TrainHooks` and never prints, so the CLI owns rendering.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .data import ImageSegmentation, pad_collate, scan_dataset
from .errors import DataError, TrainingError, TrainingInterrupted
from .io import append_jsonl, atomic_write_text, read_jsonl
from .metrics import ConfusionMatrix
from .model import ModelConfig, build_model
from .synth import SynthSpec, ensure_synth
from .transforms import IMAGENET_MEAN, IMAGENET_STD, BatchNormalize, SegmentationPresetEval, SegmentationPresetTrain

__all__ = [
    "EpochStats",
    "EvalResult",
    "FitResult",
    "TrainConfig",
    "TrainHooks",
    "autocast_context",
    "cache_budget",
    "prefers_channels_last",
    "evaluate",
    "fit",
    "make_loader",
    "resolve_data",
    "resolve_device",
    "train_one_epoch",
]


@dataclass
class TrainConfig:
    """Settings of one training run; stored in every checkpoint under ``train_config``."""

    data: str | None = None
    epochs: int = 20
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    image_size: int = 64
    base_channels: int = 16
    depth: int = 3
    num_convs: int = 2
    upsample: str = "transpose"
    block_order: str = "conv-relu-bn"
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    workers: int | None = None
    cache: bool | None = None
    seed: int = 0
    out: str = "runs"
    name: str | None = None
    resume: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainHooks:
    """Progress callbacks; the default does nothing. Override what you want to show."""

    def on_scan(self, done: int, total: int) -> None: ...

    def on_start(self, run_dir: Path, epochs: int, steps_per_epoch: int, start_epoch: int, device: str) -> None: ...

    def on_step(self, epoch: int, step: int, loss: float) -> None: ...

    def on_epoch_end(self, record: dict[str, Any]) -> None: ...


class EpochStats(NamedTuple):
    """What `train_one_epoch` measured: mean loss, images seen, and seconds spent waiting for batches."""

    loss: float
    images: int
    data_time: float


@dataclass
class EvalResult:
    miou: float
    per_class_iou: list[float]
    pixel_accuracy: float
    confusion: torch.Tensor

    def to_dict(self, classes: list[str]) -> dict[str, Any]:
        return {
            "miou": _json_float(self.miou),
            "pixel_accuracy": _json_float(self.pixel_accuracy),
            "per_class_iou": {name: _json_float(v) for name, v in zip(classes, self.per_class_iou)},
        }


@dataclass
class FitResult:
    run_dir: Path
    best_miou: float
    best_epoch: int
    final: EvalResult
    classes: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} requested but CUDA is not available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainingError("device 'mps' requested but Apple MPS is not available on this machine")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise TrainingError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def autocast_context(device: torch.device, enabled: bool) -> tuple[AbstractContextManager, torch.dtype | None]:
    """Mixed precision on CUDA only: bf16 where supported, otherwise fp16 (which needs a grad scaler)."""
    if not enabled or device.type != "cuda":
        return nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype), dtype


def resolve_data(data: str | None, progress: Callable[[int, int], None] | None = None) -> Path:
    """The user's dataset folder, or the embedded synthetic set generated once into the cache."""
    if data is None:
        return ensure_synth(SynthSpec(), progress)
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    return root


def prefers_channels_last(device: torch.device) -> bool:
    """oneDNN (CPU) and cuDNN (tensor cores) run UNetStudent's convolutions faster in NHWC:
    a training step on 2 CPU cores took 298 ms instead of 345 (base 16, depth 3, batch 16, 64x64)."""
    return device.type in ("cpu", "cuda")


def cache_budget() -> int:
    """Bytes of decoded images `fit` keeps in memory unless told otherwise: a quarter of the memory
    available now, at most 4 GiB (1 GiB where the platform does not say)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 1 << 30
    return min(available // 4, 4 << 30)


def make_loader(
    dataset: ImageSegmentation,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int,
    ignore_index: int | None,
    pin_memory: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
    seed: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    from functools import partial

    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=partial(pad_collate, ignore_index=255 if ignore_index is None else ignore_index),
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        generator=generator,
    )


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    device: torch.device,
    *,
    autocast: AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, float], None] | None = None,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EpochStats:
    """One pass over `loader`. A non-finite loss stops training.

    `normalize` turns each batch, once on `device`, into the model's input (see `BatchNormalize`).
    `EpochStats.data_time` is the time spent waiting for the loader: near zero when data loading
    keeps up with the model.
    """
    model.train()
    total_loss = torch.zeros((), device=device)
    seen = 0
    data_time = 0.0
    non_blocking = device.type == "cuda"
    batches = iter(loader)
    step = 0
    while True:
        waited = time.perf_counter()
        batch = next(batches, None)
        data_time += time.perf_counter() - waited
        if batch is None:
            break
        images = batch[0].to(device, non_blocking=non_blocking)
        masks = batch[1].to(device, non_blocking=non_blocking)
        if normalize is not None:
            images = normalize(images)
        with autocast or nullcontext():
            loss = criterion(model(images), masks)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {float(loss.detach())} at step {step + 1}; try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total_loss += loss.detach() * images.shape[0]
        seen += images.shape[0]
        if on_step is not None:
            on_step(step, float(loss.detach()))
        step += 1
    return EpochStats(float(total_loss) / max(seen, 1), seen, data_time)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    num_classes: int,
    ignore_index: int | None,
    device: torch.device,
    *,
    autocast: AbstractContextManager | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """mIoU from one confusion matrix accumulated over every pixel of `loader`.

    `reduce`, when given, combines the matrix across processes (distributed evaluation);
    `normalize` prepares each batch on `device`, as in `train_one_epoch`.
    """
    model.eval()
    confusion = ConfusionMatrix(num_classes, ignore_index)
    confusion.matrix = confusion.matrix.to(device)
    for images, masks in loader:
        images = images.to(device)
        masks = masks.to(device)
        if normalize is not None:
            images = normalize(images)
        with autocast or nullcontext():
            logits = model(images)
        confusion.update(logits.argmax(1), masks)
    if reduce is not None:
        confusion.matrix = reduce(confusion.matrix)
    confusion.matrix = confusion.matrix.cpu()
    per_class, miou = confusion.compute()
    return EvalResult(miou, per_class.tolist(), confusion.pixel_accuracy(), confusion.matrix)


def _warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _new_run_dir(out: str, name: str | None) -> Path:
    base = Path(out)
    stem = name or "unet"
    candidate = base / stem
    index = 2
    while candidate.exists() and any(candidate.iterdir()):
        candidate = base / f"{stem}-{index}"
        index += 1
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def fit(config: TrainConfig, hooks: TrainHooks | None = None, distributed: Any | None = None) -> FitResult:
    """Train `UNetStudent` on `config.data` (or the embedded set) and write the run folder.

    Writes `best.pt` (best val mIoU), `last.pt`, `metrics.jsonl` and `curves.png`. With
    `config.resume`, continues from that checkpoint's epoch, weights, optimizer and schedule.
    `distributed`, when given, is a `unet_edge.distributed.DistContext` (rank, world size, reduce).
    """
    hooks = hooks or TrainHooks()
    is_main = distributed is None or distributed.is_main
    resumed: dict[str, Any] | None = None
    if config.resume:
        resumed = load_checkpoint(config.resume)
        saved = dict(resumed.get("train_config", {}))
        keep = {k: getattr(config, k) for k in ("epochs", "device", "workers", "cache", "resume", "amp", "compile")}
        merged = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
        config = replace(config, **{**merged, **keep})
    device = distributed.device if distributed is not None else resolve_device(config.device)
    _seed_everything(config.seed + (distributed.rank if distributed is not None else 0))

    root = resolve_data(config.data)
    scan = scan_dataset(root, ("train", "val"), progress=hooks.on_scan if is_main else None)
    info = scan.info
    if resumed is not None and list(info.classes) != list(resumed["classes"]):
        raise DataError(
            f"{root}: classes {list(info.classes)} (from {scan.info_source}) differ from those of {config.resume}: {list(resumed['classes'])}"
        )
    ignore_index = info.ignore_index
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    workers = config.workers if config.workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    # Decoded images stay in memory when they fit (by default only without loader workers, which
    # would each hold a copy); the loader hands over uint8 crops, normalised per batch on the device.
    cache_bytes = scan.decoded_bytes("train") + scan.decoded_bytes("val")
    processes = distributed.world_size if distributed is not None else 1
    cache = config.cache if config.cache is not None else workers == 0 and cache_bytes * processes <= cache_budget()
    train_set = ImageSegmentation(
        root,
        "train",
        SegmentationPresetTrain(
            crop_size=config.image_size, mean=mean, std=std, ignore_index=ignore_index if ignore_index is not None else 255, normalize=False
        ),
        cache=cache,
    )
    val_set = ImageSegmentation(root, "val", SegmentationPresetEval(mean=mean, std=std, normalize=False), cache=cache)
    if cache and workers > 0:
        train_set.fill_cache()
        val_set.fill_cache()
    channels_last = prefers_channels_last(device)
    normalize = BatchNormalize(mean, std, channels_last=channels_last)
    pin = device.type == "cuda"
    train_sampler = distributed.sampler(train_set, shuffle=True, seed=config.seed) if distributed else None
    val_sampler = distributed.eval_sampler(val_set) if distributed else None
    train_count = len(train_sampler) if train_sampler is not None else len(train_set)
    train_loader = make_loader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        workers=workers,
        ignore_index=ignore_index,
        pin_memory=pin,
        sampler=train_sampler,
        seed=config.seed + (distributed.rank if distributed is not None else 0),
        drop_last=train_count > config.batch_size,
    )
    val_loader = make_loader(
        val_set, batch_size=config.batch_size, shuffle=False, workers=workers, ignore_index=ignore_index, sampler=val_sampler
    )

    model_config = ModelConfig(
        num_classes=info.num_classes,
        base_channels=config.base_channels,
        depth=config.depth,
        num_convs=config.num_convs,
        upsample=config.upsample,
        block_order=config.block_order,
    )
    model = build_model(model_config).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = len(train_loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(total_steps, max(1, int(config.warmup_fraction * total_steps)))
    )
    autocast, amp_dtype = autocast_context(device, config.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start_epoch, best_miou, best_epoch = 0, -1.0, -1
    history: list[dict[str, Any]] = []
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        if "optimizer" in resumed:
            optimizer.load_state_dict(resumed["optimizer"])
        if "lr_scheduler" in resumed:
            scheduler.load_state_dict(resumed["lr_scheduler"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        start_epoch = int(resumed.get("epoch", 0))
        best_miou = float(resumed.get("best_miou", -1.0))
        best_epoch = int(resumed.get("best_epoch", -1))
        run_dir = Path(config.resume).resolve().parent
        if is_main:
            _forget_after(run_dir, start_epoch)
    elif is_main:
        run_dir = _new_run_dir(config.out, config.name)
    else:
        run_dir = Path(config.out) / (config.name or "unet")
    if distributed is not None:
        run_dir = distributed.broadcast_path(run_dir)

    train_model: nn.Module = model
    if distributed is not None:
        train_model = distributed.wrap(model)
    if config.compile:
        train_model = torch.compile(train_model)
    criterion = nn.CrossEntropyLoss(ignore_index=ignore_index if ignore_index is not None else -100)

    def state(epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "config": model_config.to_dict(),
            "classes": list(info.classes),
            "ignore_index": ignore_index,
            "mean": list(mean),
            "std": list(std),
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "best_miou": best_miou,
            "best_epoch": best_epoch,
            "metrics": metrics,
            "train_config": config.to_dict(),
            "data_root": str(root),
        }

    if is_main:
        hooks.on_start(run_dir, config.epochs, steps_per_epoch, start_epoch, str(device))
    final: EvalResult | None = None
    epoch = start_epoch
    saved_epoch: int | None = start_epoch if resumed is not None else None
    try:
        for epoch in range(start_epoch, config.epochs):
            if train_sampler is not None:
                train_sampler.set_epoch(epoch)
            started = time.perf_counter()
            try:
                train_loss, seen, data_time = train_one_epoch(
                    train_model,
                    train_loader,
                    optimizer,
                    scheduler,
                    criterion,
                    device,
                    autocast=autocast,
                    scaler=scaler,
                    on_step=(lambda step, loss, e=epoch: hooks.on_step(e, step, loss)) if is_main else None,
                    normalize=normalize,
                )
            except TrainingError as exc:
                kept = f"{run_dir / 'last.pt'} (epoch {epoch}) is kept unchanged" if (run_dir / "last.pt").is_file() else "no checkpoint was written"
                raise TrainingError(f"training stopped in epoch {epoch + 1}: {exc}; {kept}") from None
            if distributed is not None:
                train_loss, seen = distributed.reduce_loss(train_loss, seen)
            train_time = time.perf_counter() - started
            if distributed is not None:
                distributed.broadcast_buffers(model)
            # Validation runs in fp32, as `unet-edge eval` and the exported models do, so the logged
            # mIoU is that of the saved weights whatever precision trained them.
            final = evaluate(
                model,
                val_loader,
                info.num_classes,
                ignore_index,
                device,
                reduce=distributed.all_reduce_sum if distributed is not None else None,
                normalize=normalize,
            )
            record = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "lr": scheduler.get_last_lr()[0],
                "train_images_per_s": seen / train_time if train_time > 0 else None,
                "data_time_s": data_time,
                "epoch_time_s": time.perf_counter() - started,
                **final.to_dict(list(info.classes)),
            }
            history.append(record)
            if is_main:
                # The record goes first: after a crash before last.pt is renamed, --resume drops it again.
                append_jsonl(run_dir / "metrics.jsonl", record)
            if final.miou > best_miou:
                best_miou, best_epoch = final.miou, epoch + 1
                if is_main:
                    save_checkpoint(run_dir / "best.pt", state(epoch + 1, record))
            if is_main:
                save_checkpoint(run_dir / "last.pt", state(epoch + 1, record))
                saved_epoch = epoch + 1
                hooks.on_epoch_end(record)
    except KeyboardInterrupt:
        if not is_main:
            raise
        # last.pt already holds the last finished epoch; weights from part of an epoch would not match
        # its learning-rate schedule, so the partial epoch is dropped rather than saved.
        last = run_dir / "last.pt"
        if saved_epoch is None:
            raise TrainingInterrupted(f"interrupted in epoch {epoch + 1}, before any epoch finished: nothing was saved") from None
        raise TrainingInterrupted(
            f"interrupted in epoch {epoch + 1}: {last} holds epoch {saved_epoch}; continue with --resume {last}"
        ) from None
    if is_main:
        write_curves(run_dir)
        atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    if final is None:
        raise TrainingError(f"nothing to train: the checkpoint is already at epoch {start_epoch} of {config.epochs}")
    return FitResult(run_dir, best_miou, best_epoch, final, list(info.classes), history)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run (a partial last line from a crash is skipped)."""
    return read_jsonl(run_dir / "metrics.jsonl")


def _forget_after(run_dir: Path, epoch: int) -> None:
    """Before resuming at `epoch`: drop later records (written before a crash that lost their
    checkpoint) and temporary files that a killed writer left behind."""
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        kept = "".join(json.dumps(record) + "\n" for record in read_metrics(run_dir) if record.get("epoch", 0) <= epoch)
        if kept.encode("utf-8") != log.read_bytes():
            atomic_write_text(log, kept)
    for stale in run_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def write_curves(run_dir: Path) -> Path | None:
    """Plot train loss and val mIoU per epoch (all epochs, resumed ones included) to curves.png."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    ax_miou.plot(epochs, [r["miou"] if r["miou"] is not None else float("nan") for r in records], marker="o", color="C1")
    ax_miou.set(xlabel="epoch", ylabel="val mIoU", title="Validation mIoU", ylim=(0, 1))
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    target = run_dir / "curves.png"
    from .io import atomic_path

    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return target
