"""Training as plain functions: `train_one_epoch`, and `fit`, which ties it to data, evaluation and a run folder.

The pieces live beside it: settings in `config`, device policy in `device`, loaders in `loaders`,
validation in `evaluate`, the run folder in `runs`. The library reports progress through
`TrainHooks` and never prints, so the CLI owns rendering.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Collection, Sized
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .config import DEFAULT_EPOCHS, Loss, ModelConfig, TrainConfig, schedule_epochs
from .device import Precision, mixed_precision, place_model, prefers_channels_last, resolve_device, run_environments
from .distill import Distillation
from .errors import DataError, OutputError, TrainingError
from .evaluate import EvalResult, evaluate
from .hooks import TrainHooks
from .loaders import TrainingData, cache_budget, pad_index, training_data
from .metrics import ConfusionMatrix
from .model import build_model
from .runs import RunFolder

__all__ = [
    "AuxiliaryLoss",
    "EpochStats",
    "FitResult",
    "ModelEma",
    "TrainConfig",
    "TrainHooks",
    "Training",
    "WarmupCosine",
    "fit",
    "resume_config",
    "run_epoch",
    "segmentation_loss",
    "train_one_epoch",
]

# Settings that shape a run: resuming keeps the saved values, and an explicitly different one is an error.
# Settings whose saved values a resumed run uses unless given: where the data and the teacher are now (the
# teacher file must be the same one, by sha256), and how many epochs in all.
RESUME_OVERRIDES = ("data", "teacher", "epochs")
# Settings of this invocation only (how to run, not what to train).
SESSION_SETTINGS = ("device", "amp", "compile", "workers", "cache", "distill_cache", "resume")
RUN_SETTINGS = tuple(k for k in TrainConfig().settings() if k not in (*RESUME_OVERRIDES, *SESSION_SETTINGS))
# Steps between two reads of the loss on the host (each read waits for the GPU to finish its queue).
LOSS_CHECK_EVERY = 25


class AuxiliaryLoss(Protocol):
    """A term `fit` adds to the segmentation loss, with what it needs around the loop (distillation is one).

    `prepare` may hand back other training data (such as batches that carry per-pixel targets: they reach
    the term as `extras`, the batch's tensors after the mask); `note` is shown once training data is ready;
    `record` goes into every checkpoint; `epoch_record` adds fields to each epoch's record (given the seconds
    of the epoch's steps); `after_validation` may return a warning for the user.
    """

    @property
    def note(self) -> str: ...

    def prepare(self, data: TrainingData, device: torch.device, *, cache: bool | None, budget: int) -> TrainingData: ...

    def record(self) -> dict[str, Any]: ...

    def begin_epoch(self, epoch: int, steps_per_epoch: int) -> None: ...

    def __call__(
        self, images: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor, extras: tuple[torch.Tensor, ...], /
    ) -> torch.Tensor: ...

    def epoch_record(self, step_time: float) -> dict[str, Any]: ...

    def after_validation(self, epoch: int, miou: float) -> str | None: ...


class EpochStats(NamedTuple):
    """What `train_one_epoch` measured: mean loss, images seen, and seconds spent waiting for batches."""

    loss: float
    images: int
    data_time: float


@dataclass
class FitResult:
    run_dir: Path
    best_miou: float
    best_epoch: int
    final: EvalResult
    classes: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)


class WarmupCosine:
    """Learning-rate factor per step: linear warm-up, then cosine decay to zero at `total_steps`.

    A callable object rather than a function, so the scheduler's state (hence the checkpoint) keeps
    its fields; `retarget` moves the end of a run without a jump in the learning rate.
    """

    def __init__(self, total_steps: int, warmup_fraction: float) -> None:
        self.total_steps = total_steps
        self.warmup_steps = max(1, int(warmup_fraction * total_steps))
        self.decay_start = 0
        self.decay_from = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start = max(self.decay_start, self.warmup_steps)
        progress = (step - start) / max(self.total_steps - start, 1)
        return self.decay_from * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def retarget(self, step: int, total_steps: int) -> None:
        """End at `total_steps` instead: past the warm-up, the cosine restarts from the factor at `step`."""
        if step >= self.warmup_steps:
            self.decay_from, self.decay_start = self(step), step
        self.total_steps = total_steps


class ModelEma:
    """Exponential moving average of a model's weights and buffers (as timm's `ModelEmaV3`).

    The average moves towards the model after every optimiser step by ``1 - decay``, with the
    decay warmed up as ``min(decay, (1 + n) / (10 + n))`` after `n` updates so that early, random
    weights fade fast. Validating the average instead of the last step's weights smooths out the
    epoch-to-epoch swings of small-batch training.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.source = model
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        """One step towards the source model's current weights."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        averaged = list(self.module.state_dict().values())
        current = list(self.source.state_dict().values())
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - decay)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)


@dataclass
class Training:
    """The model and what updates it: optimiser, schedule, precision and loss, set up once by `fit`."""

    model: nn.Module
    train_model: nn.Module
    model_config: ModelConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: Precision
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    ema: ModelEma | None = None
    auxiliary: AuxiliaryLoss | None = None

    @property
    def validated_model(self) -> nn.Module:
        """The weights that validation measures and checkpoints save as "model": the average when kept."""
        return self.ema.module if self.ema is not None else self.model

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        data: TrainingData,
        device: torch.device,
        distributed: Any | None,
        planned_epochs: int,
        auxiliary: AuxiliaryLoss | None = None,
    ) -> Training:
        """A new model for `data`'s classes, AdamW, and a warm-up + cosine schedule over `planned_epochs`;
        with `auxiliary`, the loss gains its term."""
        num_classes = len(data.classes)
        if config.model.num_classes not in (None, num_classes):
            raise DataError(
                f"{data.root}: {num_classes} classes, but the model settings ask for {config.model.num_classes}"
            )
        model_config = replace(config.model, num_classes=num_classes)
        model = place_model(build_model(model_config), device, training=True)
        train_model = distributed.wrap(model) if distributed is not None else model
        if config.compile:
            train_model = torch.compile(train_model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.peak_lr, weight_decay=config.weight_decay)
        schedule = WarmupCosine(len(data.train_loader) * planned_epochs, config.warmup_fraction)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        precision = mixed_precision(device, config.amp)
        ema = ModelEma(model, config.ema_decay) if config.ema_decay > 0 else None
        criterion = segmentation_loss(data.ignore_index, config.loss)
        return cls(model, train_model, model_config, optimizer, scheduler, precision, criterion, device, ema, auxiliary)

    def state_dict(self) -> dict[str, Any]:
        """Weights, model settings and the optimiser, schedule and scaler states, as a checkpoint holds them.

        "model" holds the validated weights (what eval, export and verify load); with an average kept,
        the optimiser's own weights go under "online_model" for resuming.
        """
        scaler = self.precision.scaler
        ema = {} if self.ema is None else {"online_model": self.model.state_dict(), "ema_updates": self.ema.updates}
        return {
            "model": self.validated_model.state_dict(),
            **ema,
            "config": self.model_config.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
        }

    def restore(self, state: dict[str, Any], total_steps: int, source: str) -> None:
        """Continue from checkpoint `state` (read from `source`); when the run now ends at another step, the
        learning rate decays from where it is to the new end instead of jumping back up."""
        self.model.load_state_dict(state.get("online_model", state["model"]))
        if self.ema is not None:
            self.ema.module.load_state_dict(state["model"])
            self.ema.updates = int(state.get("ema_updates", 0))
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "lr_scheduler" in state:
            self.scheduler.load_state_dict(state["lr_scheduler"])
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        schedule, step = cast(WarmupCosine, self.scheduler.lr_lambdas[0]), self.scheduler.last_epoch
        if schedule.total_steps != total_steps:
            if schedule(step) <= 0.0:
                raise TrainingError(
                    f"{source}: its run finished its learning-rate decay (lr 0), so more epochs would not change "
                    "the weights; start a new run with more --epochs"
                )
            schedule.retarget(step, total_steps)


def segmentation_loss(
    ignore_index: int | None, kind: str = "ce"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss: "ce", cross-entropy averaged over the pixels that count, or "dice-ce", that
    plus a soft Dice loss (nnU-Net's default pairing, smp's `DiceLoss` in multiclass mode).

    A batch whose pixels are all ignored gives 0 (PyTorch's mean reduction divides by zero there and
    returns NaN, which would stop training). The Dice term is one minus the mean, over the classes present
    in the batch's counted pixels, of each class's soft Dice computed over the whole batch; it weighs every
    class alike whatever its pixel count, so small objects on a large background learn from the first
    epochs instead of after the background is fitted.
    """
    kind = Loss(kind)
    ignore = pad_index(ignore_index)
    criterion = nn.CrossEntropyLoss(ignore_index=ignore, reduction="sum")

    def cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        counted = (masks != ignore).sum().clamp_min(1)
        return criterion(logits, masks) / counted

    if kind is Loss.CE:
        return cross_entropy

    def dice_ce(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        valid = (masks != ignore).unsqueeze(1)
        probs = logits.float().softmax(1) * valid
        target = torch.zeros_like(probs).scatter_(1, torch.where(valid.squeeze(1), masks, 0).unsqueeze(1), 1.0) * valid
        dims = (0, 2, 3)
        present = target.sum(dims)
        dice = 2 * (probs * target).sum(dims) / (probs.sum(dims) + present).clamp_min(1e-6)
        counted = (present > 0).sum()
        dice_loss = ((1 - dice) * (present > 0)).sum() / counted.clamp_min(1)
        return cross_entropy(logits, masks) + dice_loss

    return dice_ce


def _finite_loss(loss: torch.Tensor, step: int) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(f"loss became {value} at step {step + 1}; try a lower --lr")
    return value


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    *,
    autocast: AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, float], None] | None = None,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ema: ModelEma | None = None,
    auxiliary: AuxiliaryLoss | None = None,
    confusion: ConfusionMatrix | None = None,
) -> EpochStats:
    """One pass over `loader`. A non-finite loss stops training (checked every `LOSS_CHECK_EVERY` steps on
    a GPU, every step on the CPU, and at the end); `on_step` gets the loss last read. `confusion`, when given,
    accumulates every training crop's prediction as the step made it (the running train mIoU beside the val one:
    a gap between them is the model memorising its training images).

    With a grad `scaler`, a step it skips (inf/NaN gradients) does not advance the schedule.
    `ema`, when given, moves its average after every optimiser step. `auxiliary`, when given, adds its
    term (computed in the same autocast, from the batch's images, logits, mask and any further tensors) to the loss.

    `normalize` turns each batch, once on `device`, into the model's input (see `BatchNormalize`).
    `EpochStats.data_time` is the time spent waiting for the loader: near zero when data loading
    keeps up with the model.
    """
    model.train()
    total_loss = torch.zeros((), device=device)
    seen = 0
    data_time = 0.0
    non_blocking = device.type == "cuda"
    # Reading the loss on the host waits for the GPU, so on CUDA it is read (and checked) every few steps only.
    check_every = 1 if device.type == "cpu" else LOSS_CHECK_EVERY
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
        extras = tuple(part.to(device, non_blocking=non_blocking) for part in batch[2:])
        if normalize is not None:
            images = normalize(images)
        with autocast or nullcontext():
            logits = model(images)
            loss = criterion(logits, masks)
            if auxiliary is not None:
                loss = loss + auxiliary(images, logits, masks, extras)
        if confusion is not None:
            confusion.accumulate(logits.detach().argmax(1), masks)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaled = scaler.scale(loss)
            scale = scaler.get_scale()
            scaled.backward()
            scaler.step(optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= scale  # the scale backs off exactly when inf/NaN gradients skipped the step
        else:
            loss.backward()
            optimizer.step()
            stepped = True
        if stepped:
            scheduler.step()
            if ema is not None:
                ema.update()
        total_loss += loss.detach() * images.shape[0]
        seen += images.shape[0]
        if step == 0 or (step + 1) % check_every == 0:
            last_loss = _finite_loss(loss, step)
        if on_step is not None:
            on_step(step, last_loss)
        step += 1
    mean_loss = float(total_loss) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"loss became {mean_loss} in steps {step - step % check_every + 1}-{step}; try a lower --lr"
        )
    return EpochStats(mean_loss, seen, data_time)


def run_epoch(
    training: Training,
    data: TrainingData,
    epoch: int,
    distributed: Any | None,
    on_step: Callable[[int, float], None] | None,
) -> tuple[dict[str, Any], EvalResult]:
    """Train 0-based `epoch`, validate, and return the epoch's record (as metrics.jsonl holds it) and the validation."""
    if data.train_sampler is not None:
        data.train_sampler.set_epoch(epoch)
    started = time.perf_counter()
    precision = training.precision
    if training.auxiliary is not None:
        training.auxiliary.begin_epoch(epoch, len(data.train_loader))
    train_confusion = ConfusionMatrix(len(data.classes), device=training.device)
    loss, seen, data_time = train_one_epoch(
        training.train_model,
        data.train_loader,
        training.optimizer,
        training.scheduler,
        training.criterion,
        training.device,
        autocast=precision.autocast,
        scaler=precision.scaler,
        on_step=on_step,
        normalize=data.normalize,
        ema=training.ema,
        auxiliary=training.auxiliary,
        confusion=train_confusion,
    )
    if distributed is not None:
        train_confusion.reduce_from_all_processes()
        loss, seen = distributed.reduce_loss(loss, seen)
        distributed.broadcast_buffers(training.model)
        if training.ema is not None:
            distributed.broadcast_buffers(training.ema.module)
    train_time = time.perf_counter() - started
    train_miou = train_confusion.compute()[1]
    auxiliary_record = training.auxiliary.epoch_record(train_time - data_time) if training.auxiliary else {}
    # Validation runs in fp32, as `unet-edge eval` and the exported models do, so the logged mIoU is
    # that of the saved weights whatever precision trained them.
    result = evaluate(
        training.validated_model,
        data.val_loader,
        len(data.classes),
        data.ignore_index,
        training.device,
        normalize=data.normalize,
    )
    record = {
        "epoch": epoch + 1,
        "train_loss": loss,
        "train_miou": None if math.isnan(train_miou) else train_miou,
        "lr": training.scheduler.get_last_lr()[0],
        "train_images_per_s": seen / train_time if train_time > 0 else None,
        "data_time_s": data_time,
        "epoch_time_s": time.perf_counter() - started,
        **auxiliary_record,
        **result.to_dict(data.classes),
    }
    return record, result


def resume_config(
    config: TrainConfig, state: dict[str, Any], explicit: Collection[str] | None = None
) -> tuple[TrainConfig, int]:
    """The settings to continue `state` (a checkpoint) with, and the epochs its schedule was planned for.

    The run's saved settings are kept; of `config`, only how to run (device, workers, ...) and, when
    given, `data` and `epochs` apply. `explicit` names the settings the user gave (default: those that
    differ from `TrainConfig()`); one of them that differs from the saved run is an error, never ignored.
    """
    saved = TrainConfig.from_dict(state.get("train_config", {}))
    given = (
        set(explicit)
        if explicit is not None
        else {k for k, v in config.settings().items() if TrainConfig().settings()[k] != v}
    )
    current, stored = config.settings(), saved.settings()
    conflicts = [
        f"--{k.replace('_', '-')} {current[k]} (saved: {stored[k]})"
        for k in RUN_SETTINGS
        if k in given and current[k] != stored[k]
    ]
    if conflicts:
        raise TrainingError(f"{config.resume}: a resumed run keeps its saved settings; drop {', '.join(conflicts)}")
    keep = [*SESSION_SETTINGS, *(k for k in RESUME_OVERRIDES if k in given)]
    resumed = replace(saved, **{k: getattr(config, k) for k in keep})
    planned = saved.epochs if saved.epochs is not None else DEFAULT_EPOCHS  # every checkpoint stores its epochs
    return (resumed if resumed.epochs is not None else replace(resumed, epochs=planned)), planned


def _check_same_classes(config: TrainConfig, state: dict[str, Any], data: TrainingData) -> None:
    if data.classes != list(state["classes"]):
        raise DataError(
            f"{data.root}: classes {data.classes} (from {data.scan.info_source}) differ from those of {config.resume}: "
            f"{list(state['classes'])}"
        )


def fit(
    config: TrainConfig,
    hooks: TrainHooks | None = None,
    distributed: Any | None = None,
    *,
    explicit: Collection[str] | None = None,
) -> FitResult:
    """Train `UNetStudent` on `config.data` (or the embedded set) and write the run folder.

    Writes `best.pt` (best val mIoU), `last.pt`, `metrics.jsonl`, `curves.png` and `config.json`. With
    `config.resume`, continues that checkpoint's run (see `resume_config` for which settings apply).
    `distributed`, when given, is a `unet_edge.distributed.DistContext` (rank, world size, reduce).
    """
    hooks = hooks or TrainHooks()
    is_main = distributed is None or distributed.is_main
    resumed = load_checkpoint(config.resume) if config.resume else None
    planned_epochs = config.epochs
    if resumed is not None:
        config, planned_epochs = resume_config(config, resumed, explicit)
    if config.epochs is not None and config.epochs < 1:
        raise TrainingError(f"nothing to train: epochs is {config.epochs}")
    device = distributed.device if distributed is not None else resolve_device(config.device)
    rank = distributed.rank if distributed is not None else 0
    random.seed(config.seed + rank)
    torch.manual_seed(config.seed + rank)
    data = training_data(config, device, distributed, progress=hooks.on_scan if is_main else None)
    if is_main and data.scan.classes_note is not None:
        hooks.on_note(data.scan.classes_note)
    if is_main and config.hflip is None and data.hflip > 0:
        hooks.on_note(
            f"{data.root / 'dataset.json'} says the classes look the same mirrored, so training flips each image "
            f"left-right with probability {data.hflip:g} (--hflip 0 turns it off)"
        )
    # No --epochs and no run to resume: the schedule the size of the training set and the model's width call for;
    # the run records it, and the flip the loader applies (the dataset's default unless one was given).
    images = len(cast(Sized, data.train_loader.dataset))
    epochs = config.epochs if config.epochs is not None else schedule_epochs(images, config.model.base_channels)
    config = replace(config, epochs=epochs, hflip=data.hflip)
    planned_epochs = planned_epochs if planned_epochs is not None else epochs
    # The one place training names distillation: after the model is built, so that the student's initial
    # weights and crops are those of the same seed alone.
    planned_steps = len(data.train_loader) * planned_epochs
    training = Training.build(config, data, device, distributed, planned_epochs)
    auxiliary: AuxiliaryLoss | None = Distillation.for_run(
        config,
        data,
        device,
        planned_steps,
        resumed=resumed,
        channels_last=prefers_channels_last(device, training=True),
    )
    if resumed is not None and int(resumed.get("epoch", 0)) >= epochs:
        done = int(resumed.get("epoch", 0))
        raise TrainingError(f"nothing to train: {config.resume} is already at epoch {done} of {epochs}")
    if auxiliary is not None:
        data = auxiliary.prepare(data, device, cache=config.distill_cache, budget=cache_budget())
        training.auxiliary = auxiliary
    if resumed is not None:
        _check_same_classes(config, resumed, data)
        source = cast(str, config.resume)  # `resumed` was read from it
        training.restore(resumed, len(data.train_loader) * epochs, source)
        run = RunFolder.resume(source, resumed, writer=is_main)
    else:
        run = RunFolder.create(config.out, config.name, writer=is_main)
    if distributed is not None:
        run.path = distributed.broadcast_path(run.path)
    environments, moved = run_environments((resumed or {}).get("environments") or [], run.start_epoch, device)
    if moved is not None and is_main:
        hooks.on_note(
            f"this run continues at epoch {run.start_epoch + 1} with {moved}: its figures will not repeat those of "
            "an unbroken run to the last digit"
        )
    about = {**data.checkpoint_fields(), "train_config": config.to_dict(), "environments": environments}
    if auxiliary is not None:
        about.update(auxiliary.record())
        if is_main:
            hooks.on_note(auxiliary.note)
    if is_main:
        hooks.on_start(run.path, epochs, len(data.train_loader), run.start_epoch, str(device))
    history: list[dict[str, Any]] = []
    epoch = run.start_epoch
    if auxiliary is not None and run.start_epoch > 0:
        auxiliary.after_validation(run.start_epoch - 1, run.best_metric)  # no second warning for what it passed
    try:
        for epoch in range(run.start_epoch, epochs):
            on_step = (lambda step, loss, e=epoch: hooks.on_step(e, step, loss)) if is_main else None
            try:
                record, result = run_epoch(training, data, epoch, distributed, on_step)
            except TrainingError as exc:
                raise run.stopped(epoch, exc) from None
            history.append(record)
            try:
                run.save(epoch + 1, record, result.miou, {**training.state_dict(), **about})
            except OutputError as exc:  # a full disk: the files of the epoch before stay whole
                raise run.stopped(epoch, exc) from None
            if is_main:
                hooks.on_epoch_end(record)
            warning = auxiliary.after_validation(epoch, result.miou) if auxiliary is not None else None
            if warning is not None and is_main:
                hooks.on_note(warning)
    except KeyboardInterrupt:
        if not is_main:
            raise
        run.release()
        raise run.interrupted(epoch) from None
    except BaseException:
        run.release()  # the lock goes with the run; a resume in this process (or another) may take it
        raise
    run.finish(config.to_dict())
    run.release()
    return FitResult(run.path, run.best_metric, run.best_epoch, result, data.classes, history)
