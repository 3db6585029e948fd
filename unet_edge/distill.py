"""Knowledge distillation: a teacher model, frozen, and the terms that pull a student's logits towards its own.

The teacher is a unet-edge checkpoint (any width, depth, block order or up-sampling) or a TorchScript
export of one, or several as their ensemble (`unet_edge.teachers`, which loads and checks them before training
starts; re-exported here). The terms are small modules called as
``term(student_logits, teacher_logits, valid_mask)``, where `valid_mask` (N x H x W, bool) marks the
pixels that count: not the ignore index, not crop or batch padding.

`Distillation` is the whole of it for `fit`: it loads and checks the teacher, measures it, computes its
logits once per training image (`SoftLabels`, cropped and flipped with the image by the same joint transform,
so the training step runs no teacher), ramps the term in, counts it where the teacher labels the pixel right (by
default: its mistakes are not taught), and reports its timings and its checkpoint record.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torchvision import tv_tensors

from .config import DistillLoss, DistillPixels
from .teachers import (
    FrozenTeacher,
    Teacher,
    TeacherEnsemble,
    check_same_teacher,
    ensemble_digest,
    load_teacher,
    load_teachers,
    teacher_files,
)

__all__ = [
    "ChannelWiseDivergence",
    "CorrelationDistillation",
    "Distillation",
    "FrozenTeacher",
    "PixelKLDivergence",
    "SoftLabelMap",
    "SoftLabels",
    "Teacher",
    "TeacherEnsemble",
    "check_same_teacher",
    "distill_term",
    "ensemble_digest",
    "load_teacher",
    "load_teachers",
    "teacher_files",
]


class PixelKLDivergence(nn.Module):
    """KL(teacher ‖ student) of the class distributions at temperature T, per pixel, averaged over the valid
    pixels and scaled by T² so that its gradient keeps its size as T changes (Hinton et al. 2015)."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid_mask: torch.Tensor
    ) -> torch.Tensor:
        t = self.temperature
        log_student = (student_logits.float() / t).log_softmax(1)
        log_teacher = (teacher_logits.detach().float() / t).log_softmax(1)
        per_pixel = (log_teacher.exp() * (log_teacher - log_student)).sum(1)
        valid = valid_mask.to(per_pixel.dtype)
        return (per_pixel * valid).sum() / valid.sum().clamp_min(1) * t * t


class ChannelWiseDivergence(nn.Module):
    """Channel-wise distillation (Shu et al. 2021, mmrazor's `ChannelWiseDivergence`): each class's logit map
    becomes a distribution over the valid pixels (a softmax over space at temperature T), and the loss is
    KL(teacher ‖ student) of those distributions, averaged over the maps that hold a valid pixel, times T²."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid_mask: torch.Tensor
    ) -> torch.Tensor:
        t = self.temperature
        valid = valid_mask.flatten(1).unsqueeze(1)  # N x 1 x HW, broadcast over the class maps
        # A pixel that does not count gets the lowest logit there is: zero probability in both distributions.
        lowest = torch.finfo(torch.float32).min

        def log_spatial(logits: torch.Tensor) -> torch.Tensor:
            return (logits.float().flatten(2) / t).masked_fill(~valid, lowest).log_softmax(-1)

        log_student, log_teacher = log_spatial(student_logits), log_spatial(teacher_logits.detach())
        per_map = torch.where(valid, log_teacher.exp() * (log_teacher - log_student), 0.0).sum(-1)
        counted = valid.any(-1).expand_as(per_map)
        return (per_map * counted).sum() / counted.sum().clamp_min(1) * t * t


class CorrelationDistillation(nn.Module):
    """DIST (Huang et al. 2022): one minus the Pearson correlation of the student's and the teacher's class
    probabilities at temperature T, between classes at each valid pixel (inter-class) plus between pixels for
    each class over the batch's valid pixels (intra-class), times T². A correlation ignores the scale and shift
    of the probabilities, so the student matches the teacher's ranking of classes and pixels without having
    to match its confidence."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    @staticmethod
    def _one_minus_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean over the rows of 1 - Pearson correlation of rows of `a` and `b` (rows x values)."""
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        correlation = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)
        return (1 - correlation).mean()

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid_mask: torch.Tensor
    ) -> torch.Tensor:
        t = self.temperature
        valid = valid_mask.flatten()
        if not bool(valid.any()):
            return student_logits.float().sum() * 0.0

        def probabilities(logits: torch.Tensor) -> torch.Tensor:  # valid pixels x classes
            return (logits.float() / t).softmax(1).permute(0, 2, 3, 1).flatten(0, 2)[valid]

        student, teacher = probabilities(student_logits), probabilities(teacher_logits.detach())
        inter = self._one_minus_correlation(student, teacher)
        intra = self._one_minus_correlation(student.t(), teacher.t())
        return (inter + intra) * t * t


def distill_term(kind: str, temperature: float) -> nn.Module:
    """The term named by `kind` (see `DistillLoss`) at `temperature`."""
    terms = {
        DistillLoss.KL: PixelKLDivergence,
        DistillLoss.CWD: ChannelWiseDivergence,
        DistillLoss.DIST: CorrelationDistillation,
    }
    return terms[DistillLoss(kind)](temperature)


class SoftLabelMap(tv_tensors.Mask):
    """A teacher's logits (K x H x W) riding with their image through the joint training transforms: flipped,
    cropped, padded and resized (nearest) exactly as the image and its mask are. Padded pixels are ignored by
    the mask, so what they hold does not matter."""


class SoftLabels(torch.utils.data.Dataset):
    """A training set whose samples carry the teacher's logits: ``(image, mask, logits)`` after the set's own
    transforms, with the logits computed once per image by `compute`, on the whole un-augmented image.

    The teacher is fully convolutional, so the logits of a crop are (up to the border) the crop of the logits
    of the whole image: as FKD (Shen & Xing 2022) stores soft labels per region, this removes the teacher from
    every training step. They are kept in memory as float16.
    """

    def __init__(self, dataset: Any, logits: list[torch.Tensor]) -> None:
        self.dataset = dataset
        self.logits = logits

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, Any]:
        image, mask = self.dataset.load(index)
        return self.dataset.transforms(image, mask, SoftLabelMap(self.logits[index]))

    @classmethod
    @torch.no_grad()
    def compute(
        cls, dataset: Any, teacher: nn.Module, normalize: Any, device: torch.device, autocast: Any = None
    ) -> SoftLabels:
        """Run `teacher` once on each image of `dataset` (un-augmented, normalised by `normalize`)."""
        from contextlib import nullcontext

        logits = []
        for index in range(len(dataset)):
            image, _ = dataset.load(index)
            batch = normalize(image.as_subclass(torch.Tensor).unsqueeze(0).to(device))
            with autocast or nullcontext():
                logits.append(teacher(batch)[0].to("cpu", torch.float16))
        return cls(dataset, logits)


class Distillation:
    """Distillation as `fit` uses it, in one object: the frozen teacher, the term and its weight (ramped in
    linearly over `warmup_steps`), the pixels it counts (with `teacher_right_only`, those the teacher labels
    right), and where the teacher's logits come from.

    Called as ``distillation(images, student_logits, masks, extras)`` for every training batch, it returns
    ``weight * term(student_logits, teacher_logits, valid)``: the teacher's logits are ``extras[0]`` when the
    batch carries them (`SoftLabels`, see `prepare`), else the teacher runs on the same (augmented, normalised)
    batch, in the same autocast. `epoch_record` returns and resets the seconds the teacher took, its share of
    the step time and the term's mean; on CUDA the time comes from events read once per epoch, so timing adds
    no sync. `for_run` builds it from a `TrainConfig` (None without a teacher).
    """

    def __init__(
        self,
        teacher: Teacher,
        term: nn.Module,
        weight: float,
        pad_value: int,
        *,
        warmup_steps: int = 0,
        teacher_right_only: bool = False,
    ) -> None:
        self.teacher = teacher
        self.term = term
        self.weight = weight
        self.pad_value = pad_value
        self.warmup_steps = warmup_steps
        self.teacher_right_only = teacher_right_only
        self.step = 0
        self.teacher_miou: float | None = None
        self.soft_labels = False
        self._soft_label_seconds: float | None = None
        self._passed = False
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._term_sum: torch.Tensor | None = None
        self._steps = 0

    @classmethod
    def for_run(
        cls,
        config: Any,
        data: Any,
        device: torch.device,
        planned_steps: int,
        *,
        resumed: dict[str, Any] | None = None,
        channels_last: bool = False,
    ) -> Distillation | None:
        """The distillation `config` (a `TrainConfig`) asks for, or None. A resumed run must keep its teacher
        (same sha256). The teacher is loaded without touching the global random state, so a distilled run
        draws the same crops as the same seed alone."""
        if resumed is not None:
            check_same_teacher(resumed.get("teacher"), config.teacher, config.resume)
        if config.teacher is None:
            return None
        with torch.random.fork_rng(devices=[]):
            teacher = load_teachers(
                config.teacher, data.classes, data.mean, data.std, device, channels_last=channels_last
            )
        from .loaders import pad_index

        term = distill_term(config.distill_loss, config.distill_temperature)
        distillation = cls(
            teacher,
            term,
            config.distill_weight,
            pad_index(data.ignore_index),
            warmup_steps=int(config.distill_warmup * planned_steps),
            teacher_right_only=config.distill_pixels == DistillPixels.TEACHER_RIGHT,
        )
        recorded = resumed.get("teacher") if resumed is not None else None
        distillation.teacher_miou = recorded["val_miou"] if recorded else None
        return distillation

    def prepare(self, data: Any, device: torch.device, *, cache: bool | None, budget: int) -> Any:
        """`data` with the teacher's logits carried by every training sample (`SoftLabels`), when `cache` allows
        (None: when they fit in `budget` bytes and the loader has no workers that would each copy them);
        otherwise `data` unchanged, and the teacher runs in every step. Measures the teacher's val mIoU first
        (once per run, in fp32 as validation is; a resumed run keeps the figure its teacher got)."""
        from dataclasses import replace

        from .evaluate import evaluate
        from .loaders import make_loader

        if self.teacher_miou is None:
            self.teacher_miou = evaluate(
                self.teacher.model,
                data.val_loader,
                len(data.classes),
                data.ignore_index,
                device,
                normalize=data.normalize,
            ).miou
        loader = data.train_loader
        dataset = loader.dataset
        if cache is None:
            needed = 2 * len(data.classes) * data.scan.pixels.get("train", 0)  # float16 logits per pixel
            cache = loader.num_workers == 0 and needed <= budget
        if not cache:
            return data
        started = time.perf_counter()
        soft = SoftLabels.compute(dataset, self.teacher.model, data.normalize, device)
        self._soft_label_seconds = time.perf_counter() - started
        self.soft_labels = True
        train_loader = make_loader(
            soft,
            batch_size=loader.batch_size,
            shuffle=data.train_sampler is None,
            workers=loader.num_workers,
            ignore_index=data.ignore_index,
            pin_memory=loader.pin_memory,
            sampler=data.train_sampler,
            seed=loader.generator.initial_seed(),  # the same shuffle as the loader it replaces
            drop_last=loader.drop_last,
        )
        return replace(data, train_loader=train_loader)

    def record(self) -> dict[str, Any]:
        """What a checkpoint keeps about the distillation: its teacher (plain data)."""
        return {"teacher": self.teacher.record(self.teacher_miou)}

    @property
    def note(self) -> str:
        source = "logits computed once per training image" if self.soft_labels else "run on every batch"
        pixels = "; taught where it labels the pixel right" if self.teacher_right_only else ""
        return (
            f"teacher {self.teacher.name} ({self.teacher.description}): val mIoU {self.teacher_miou:.4f}; {source}"
            f"{pixels}"
        )

    def begin_epoch(self, epoch: int, steps_per_epoch: int) -> None:
        """Where the ramp stands at the start of 0-based `epoch` (so a resumed run ramps as an unbroken one)."""
        self.step = epoch * steps_per_epoch

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        if images.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = self.teacher.model(images)
            end.record()
            self._events.append((start, end))
            return logits
        started = time.perf_counter()
        logits = self.teacher.model(images)
        self._seconds += time.perf_counter() - started
        return logits

    def __call__(
        self,
        images: torch.Tensor,
        student_logits: torch.Tensor,
        masks: torch.Tensor,
        extras: tuple[torch.Tensor, ...] = (),
    ) -> torch.Tensor:
        teacher_logits = extras[0] if extras else self.teacher_logits(images)
        term = self.term(student_logits, teacher_logits, self.counted_pixels(teacher_logits, masks))
        detached = term.detach()
        self._term_sum = detached if self._term_sum is None else self._term_sum + detached
        self._steps += 1
        ramp = min(1.0, (self.step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        self.step += 1
        return self.weight * ramp * term

    def counted_pixels(self, teacher_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """N x H x W bool: the pixels the term counts. Padding and the ignore index never count; with
        `teacher_right_only`, of the others only those where the teacher's arg-max is the ground truth do, so a
        teacher's mistakes are not taught."""
        valid = masks != self.pad_value
        if self.teacher_right_only:
            valid &= teacher_logits.argmax(1) == masks
        return valid

    def take_epoch_stats(self) -> tuple[float, float | None]:
        """(seconds in the teacher's forward passes, mean of the unweighted term) since the last call."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
        mean_term = float(self._term_sum) / self._steps if self._term_sum is not None else None
        seconds = self._seconds
        self._seconds, self._events, self._term_sum, self._steps = 0.0, [], None, 0
        return seconds, mean_term

    def epoch_record(self, step_time: float) -> dict[str, Any]:
        """The epoch's fields of metrics.jsonl: the term's mean, the teacher's seconds in the steps and their share
        of the step time (0 with soft labels), and in the first epoch with soft labels the seconds they took."""
        teacher_time, mean_term = self.take_epoch_stats()
        once = {}
        if self._soft_label_seconds is not None:
            once, self._soft_label_seconds = {"soft_labels_s": self._soft_label_seconds}, None
        return {
            "distill_loss": mean_term,
            "teacher_time_s": teacher_time,
            "teacher_share": teacher_time / step_time if step_time > 0 else None,
            **once,
        }

    def after_validation(self, epoch: int, miou: float) -> str | None:
        """A warning, once, when the student's val mIoU passes the teacher's."""
        if self._passed or self.teacher_miou is None or miou <= self.teacher_miou:
            return None
        self._passed = True
        return (
            f"warning: the student's val mIoU {miou:.4f} passed the teacher's {self.teacher_miou:.4f} at epoch "
            f"{epoch + 1}; the distillation term now pulls it towards a worse model (a better teacher, or a lower "
            "--distill-weight, avoids that)"
        )
