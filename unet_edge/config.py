"""The model and training settings: one dataclass each, shared by the CLI, `fit` and the checkpoint.

Torch-free, so the CLI can use the choice Enums as option types (Typer validates them and lists
them in `--help`) without importing torch. Checkpoints store both settings as plain dicts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

__all__ = [
    "BlockOrder",
    "DistillLoss",
    "DistillPixels",
    "Downsample",
    "Loss",
    "ModelConfig",
    "TrainConfig",
    "Upsample",
    "schedule_epochs",
    "width_lr",
]

# The peak learning rate `train` picks for models of base width `LR_REFERENCE_WIDTH` and wider; narrower ones get
# more (see `width_lr`).
LR_AT_REFERENCE_WIDTH = 1e-3
LR_REFERENCE_WIDTH = 16


# The default schedule (`schedule_epochs`): DEFAULT_EPOCHS, or on a small training set enough epochs to see
# SCHEDULE_MIN_CROPS training crops (60 epochs of 240 images; a model narrower than LR_REFERENCE_WIDTH sees
# proportionally more), at most MAX_SCHEDULE_EPOCHS.
DEFAULT_EPOCHS = 20
SCHEDULE_MIN_CROPS = 14_400
MAX_SCHEDULE_EPOCHS = 200


def schedule_epochs(train_images: int, base_channels: int = LR_REFERENCE_WIDTH) -> int:
    """The epochs `train` runs when none are given, for a training set of `train_images` images and a model of
    `base_channels`: 20, or enough to see 14,400 training crops on a smaller set (60 epochs of 240 images, 29 of
    500), 16 / base times as many for a model narrower than base 16 (28,800 at base 8: 120 epochs of 240 images),
    at most 200.

    A schedule is a number of crops seen more than a number of passes: at 20 epochs of 240 images (4,800 crops)
    every student and the base-32 teacher of the distillation benchmark were still climbing when the learning rate
    reached zero, and where on that climb a run stopped depended on its seed (digits, base 8: best val mIoU 0.47 to
    0.76 over five seeds); at 60 epochs they level off well before the end (benchmarks/README.md, "Distillation").
    A narrow model needs more of them. Base-8 students, seeds 0-4, 120 epochs against 60: digits 0.941 +- 0.016
    against 0.900 +- 0.028 (at 60 two seeds levelled off at 0.87; at 120 the mean is base 16's, 0.944), shapes
    0.950 +- 0.024 against 0.946 +- 0.004 (one seed of five levelled off at 0.907), textures 0.924 +- 0.008 against
    0.921 +- 0.010: the mean up on every set, 12 of 15 seeds up. A base-8 step is a quarter of a base-16 step's
    FLOPs (1.28 against 4.84 GFLOP per 256² image).
    """
    crops = SCHEDULE_MIN_CROPS * max(1.0, LR_REFERENCE_WIDTH / base_channels)
    return max(DEFAULT_EPOCHS, min(MAX_SCHEDULE_EPOCHS, math.ceil(crops / max(1, train_images))))


# The flip `train` uses when none is given, on a dataset whose dataset.json says "mirror_symmetric": true
# (`default_hflip`).
DEFAULT_HFLIP = 0.5


def default_hflip(mirror_symmetric: bool) -> float:
    """The probability of a horizontal flip `train` uses when none is given: DEFAULT_HFLIP on a dataset whose
    classes look the same mirrored (dataset.json's "mirror_symmetric", which the embedded set declares), else 0.

    With 240 training images and no augmentation, base-8 students fit their training set alike on every seed
    (shapes, 120 epochs: train mIoU 0.98-1.00) and generalise by the luck of their seed (val mIoU 0.907 on one seed
    in five, 0.95-0.97 on the others); with the flip, 0.961 +- 0.010 over the five (textures 0.935 +- 0.010 against
    0.924 +- 0.008). A flip doubles the distinct images such a set shows; it is a default only where the
    dataset declares it harmless: a mirrored digit or letter is a shape that never occurs (flipping half of the
    digit scenes cost 0.31 val mIoU), and without dataset.json nothing says so (benchmarks/README.md,
    "Distillation").
    """
    return DEFAULT_HFLIP if mirror_symmetric else 0.0


def width_lr(base_channels: int) -> float:
    """The default peak AdamW learning rate for a U-Net of `base_channels`: 1e-3 from base 16 up, and
    1e-3 x (16 / base)² below (4e-3 at base 8).

    At 1e-3, base-8 students spend a seed-dependent part of a short schedule before they tell their classes apart
    (the background is fitted within 3 epochs; the other classes come one by one, late); at 4e-3 they leave that
    earlier (benchmarks/README.md, "Distillation"). Base 16 and wider keep the 1e-3 measured best for them ("Training
    quality"; 3e-3 sat on a plateau there).
    """
    return LR_AT_REFERENCE_WIDTH * max(1.0, LR_REFERENCE_WIDTH / base_channels) ** 2


class Upsample(StrEnum):
    """How the decoder doubles the resolution."""

    TRANSPOSE = "transpose"
    BILINEAR = "bilinear"


class Downsample(StrEnum):
    """How the encoder halves the resolution."""

    MAXPOOL = "maxpool"
    STRIDED = "strided"


class BlockOrder(StrEnum):
    """Layer order inside a block: the seed's, or one whose BatchNorm folds fully into the convolution."""

    CONV_RELU_BN = "conv-relu-bn"
    CONV_BN_RELU = "conv-bn-relu"


class Loss(StrEnum):
    """The training loss (see `unet_edge.train.segmentation_loss`)."""

    CE = "ce"
    DICE_CE = "dice-ce"


class DistillLoss(StrEnum):
    """The distillation term on the logits (see `unet_edge.distill`): pixel-wise KL over the classes,
    channel-wise divergence over each class map's pixels, or DIST's inter- and intra-class correlation."""

    KL = "kl"
    CWD = "cwd"
    DIST = "dist"


class DistillPixels(StrEnum):
    """Where the distillation term counts: every valid pixel, or only those the teacher labels right (its
    arg-max equals the ground truth), so that a teacher's mistakes are never taught."""

    ALL = "all"
    TEACHER_RIGHT = "teacher-right"


def _choice(enum: type[StrEnum], name: str, value: str) -> str:
    try:
        return enum(value).value
    except ValueError:
        raise ValueError(f"{name} must be one of {', '.join(enum)}, got {value!r}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a `UNetStudent`; stored in checkpoints as a plain dict.

    `num_classes` may be None in training settings: `fit` takes it from the dataset.
    """

    num_classes: int | None = None
    in_channels: int = 3
    base_channels: int = 32
    depth: int = 4
    num_convs: int = 2
    upsample: str = Upsample.TRANSPOSE.value
    downsample: str = Downsample.MAXPOOL.value
    block_order: str = BlockOrder.CONV_RELU_BN.value

    def __post_init__(self) -> None:
        # Enum members or their strings are accepted; plain strings are stored (checkpoints hold plain data).
        object.__setattr__(self, "upsample", _choice(Upsample, "upsample", self.upsample))
        object.__setattr__(self, "downsample", _choice(Downsample, "downsample", self.downsample))
        object.__setattr__(self, "block_order", _choice(BlockOrder, "block_order", self.block_order))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; stored in every checkpoint under ``train_config``.

    `model` holds the architecture (the CLI's model options fill it directly); its `num_classes`
    comes from the dataset unless set. Augmentation: `hflip` is the probability of a horizontal flip
    (0: none; None: `DEFAULT_HFLIP` when the dataset's dataset.json says its classes are mirror-symmetric, else
    none, and `fit` stores the value it ran), `scale_min`..`scale_max` the range of the random resize before the
    crop (1..1: none).
    `ema_decay` > 0 keeps an exponential moving average of the weights, which is what validation
    measures and best.pt holds. `epochs` None runs the schedule `schedule_epochs` picks from the size of the
    training set and the model's width (`fit` stores the number it ran). `lr` None picks the peak learning rate
    from the model's width (`width_lr`).
    `loss` is "dice-ce" (cross-entropy plus soft Dice) or "ce"; checkpoints
    saved before the setting existed trained with "ce". `teacher` (a checkpoint or TorchScript file, or several:
    their ensemble) adds `distill_weight` times the `distill_loss` term at `distill_temperature` to the loss, its
    weight rising linearly from 0 over the first `distill_warmup` fraction of the steps, counted on the pixels
    `distill_pixels` names (those the teacher labels right, or every valid one); checkpoints saved before the
    setting existed distilled on every valid pixel. `distill_cache` computes the teacher's logits once per training
    image instead of in every step (None: when they fit in memory).
    """

    data: str | None = None
    epochs: int | None = None
    batch_size: int = 16
    lr: float | None = None
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    image_size: int = 64
    hflip: float | None = None
    scale_min: float = 1.0
    scale_max: float = 1.0
    ema_decay: float = 0.0
    loss: str = "dice-ce"
    teacher: str | tuple[str, ...] | None = None
    distill_loss: str = "dist"
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    distill_warmup: float = 0.0
    distill_pixels: str = "teacher-right"
    distill_cache: bool | None = None
    model: ModelConfig = field(default_factory=lambda: ModelConfig(base_channels=16, depth=3))
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    workers: int | None = None
    cache: bool | None = None
    seed: int = 0
    out: str = "runs"
    name: str | None = None
    resume: str | None = None

    def __post_init__(self) -> None:
        if self.hflip is not None and not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in 0..1, got {self.hflip}")
        if not 0.0 < self.scale_min <= self.scale_max:
            raise ValueError(f"scale jitter must be 0 < min <= max, got {self.scale_min},{self.scale_max}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {self.ema_decay}")
        object.__setattr__(self, "loss", _choice(Loss, "loss", self.loss))
        object.__setattr__(self, "distill_loss", _choice(DistillLoss, "distill loss", self.distill_loss))
        object.__setattr__(self, "distill_pixels", _choice(DistillPixels, "distill pixels", self.distill_pixels))
        if self.distill_weight < 0:
            raise ValueError(f"distill weight must be >= 0, got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill temperature must be > 0, got {self.distill_temperature}")
        if not 0.0 <= self.distill_warmup <= 1.0:
            raise ValueError(f"distill warm-up must be a fraction of the run in 0..1, got {self.distill_warmup}")

    @property
    def peak_lr(self) -> float:
        """The peak learning rate of the run: `lr`, or when None the one `width_lr` picks for the model."""
        return self.lr if self.lr is not None else width_lr(self.model.base_channels)

    @property
    def scale_range(self) -> tuple[float, float] | None:
        """The scale jitter range, or None when it is off."""
        return None if self.scale_min == self.scale_max == 1.0 else (self.scale_min, self.scale_max)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Read a stored `train_config`; older checkpoints kept the model fields at the top level, flipped half
        of the training images without saying so, and distilled on every valid pixel."""
        data = {"hflip": 0.5, "loss": "ce", "distill_pixels": "all", **data}
        train_fields = {f.name for f in fields(cls)} - {"model"}
        model_fields = {f.name for f in fields(ModelConfig)}
        model = {k: v for k, v in data.items() if k in model_fields}
        model.update(data.get("model") or {})
        if isinstance(data.get("teacher"), list):  # an ensemble's files, a list once stored as JSON
            data["teacher"] = tuple(data["teacher"])
        return cls(**{k: v for k, v in data.items() if k in train_fields}, model=replace(TrainConfig().model, **model))

    def settings(self) -> dict[str, Any]:
        """The settings as one flat dict (model fields beside the others), named as the CLI options are."""
        flat = {k: v for k, v in self.to_dict().items() if k != "model"}
        return {**flat, **self.model.to_dict()}
