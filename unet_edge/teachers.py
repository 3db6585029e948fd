"""Teachers for distillation: a unet-edge checkpoint or a TorchScript export of one, or several as their ensemble,
loaded frozen and checked against the student's classes, normalisation and shapes before training starts, and
identified by sha256 so that a resumed run keeps the same teacher.

A teacher must read the same normalised N x 3 x H x W input and give N x K x H x W logits over the same classes.
Several teachers act as one (`TeacherEnsemble`: the mean of their class probabilities), such as students of the
same width trained on other seeds.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifact import NCHW_FLOAT, read_metadata
from .checkpoint import load_model
from .errors import ArtifactError, CheckpointError, TrainingError
from .formats.torchscript import is_torchscript, load_torchscript
from .io import sha256_file

__all__ = [
    "FrozenTeacher",
    "Teacher",
    "TeacherEnsemble",
    "check_same_teacher",
    "ensemble_digest",
    "load_teacher",
    "load_teachers",
    "teacher_files",
]

# Side of the blank image a teacher is run on once, to check its input and output shapes.
_PROBE_SIZE = 32


class FrozenTeacher(nn.Module):
    """A model that never trains: no gradients, eval mode for good (a later `train()` keeps it in eval mode,
    so its BatchNorm statistics never move), forward under `torch.no_grad()`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        for parameter in module.parameters():  # ScriptModules have no requires_grad_()
            parameter.requires_grad_(False)
        self.module = module.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


class TeacherEnsemble(nn.Module):
    """Several teachers as one: logits whose softmax is the mean of the members' class probabilities (the log of
    that mean), so the teacher-right pixels, the soft labels and the terms over the classes (kl, dist) treat the
    ensemble as one model; cwd, which reads each class map over the pixels, sees those log-probabilities. An
    average of students that differ only in their seed is more accurate than any of them, and steadier."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.log_count = math.log(len(members))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        log_probs = [member(images).float().log_softmax(1) for member in self.members]
        return torch.logsumexp(torch.stack(log_probs), 0) - self.log_count


@dataclass
class Teacher:
    """A loaded, checked teacher: the frozen model on the training device and what identifies its file; for an
    ensemble (`kind` "ensemble"), its members, each a `Teacher` of one file, and a digest of theirs."""

    model: FrozenTeacher
    path: Path
    sha256: str
    kind: str
    description: str
    members: tuple[Teacher, ...] = ()

    @property
    def name(self) -> str:
        """The file, or for an ensemble its files."""
        return ", ".join(str(m.path) for m in self.members) if self.members else str(self.path)

    def record(self, val_miou: float | None) -> dict[str, Any]:
        """What a checkpoint keeps about the teacher (plain data): an ensemble's "path" is the list of its files."""
        record: dict[str, Any] = {
            "path": [str(m.path) for m in self.members] if self.members else str(self.path),
            "sha256": self.sha256,
            "kind": self.kind,
            "description": self.description,
            "val_miou": val_miou,
        }
        if self.members:
            record["members"] = [{k: v for k, v in m.record(None).items() if k != "val_miou"} for m in self.members]
        return record


def teacher_files(teacher: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None) -> tuple[Path, ...]:
    """The teacher's file, or an ensemble's files, as `TrainConfig.teacher` or a checkpoint's record holds them."""
    if teacher is None:
        return ()
    if isinstance(teacher, (str, os.PathLike)):
        return (Path(teacher),)
    return tuple(Path(path) for path in teacher)


def ensemble_digest(digests: Sequence[str]) -> str:
    """What identifies a teacher from its files' sha256s: one file's own; an ensemble's, the sha256 of its members'
    sha256s in their order."""
    return digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _load_torchscript(path: Path) -> tuple[nn.Module, list[str], tuple[float, ...], tuple[float, ...], str]:
    module, meta = load_torchscript(path)
    info = read_metadata(meta, path)
    if info.input_format != NCHW_FLOAT:
        raise ArtifactError(
            f"{path}: takes {info.input_format} input; a teacher must take the normalised {NCHW_FLOAT} batch"
        )
    config = info.model_config
    description = (
        f"TorchScript, base {config['base_channels']}, depth {config['depth']}"
        if {"base_channels", "depth"} <= set(config)
        else "TorchScript"
    )
    return module, info.classes, info.mean, info.std, description


def _check_shapes(module: nn.Module, num_classes: int, path: Path) -> None:
    """Run the teacher once on a blank batch: it must take 3 input channels and give `num_classes` maps of the input's
    size."""
    probe = torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE)
    try:
        with torch.no_grad():
            logits = module(probe)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: does not take a 3-channel image batch ({str(exc).splitlines()[0][:160]})"
        ) from None
    expected = (1, num_classes, _PROBE_SIZE, _PROBE_SIZE)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CheckpointError(
            f"{path}: gives {got} for a 1x3x{_PROBE_SIZE}x{_PROBE_SIZE} input; a teacher must give logits of shape "
            f"{expected}"
        )


def load_teacher(
    path: str | os.PathLike[str],
    classes: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    *,
    channels_last: bool = False,
) -> Teacher:
    """Load the teacher at `path` (checkpoint, loaded with weights_only=True, or TorchScript), check that it
    predicts `classes` from images normalised with `mean`/`std`, and place it frozen on `device`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: teacher not found"
            if not path.is_dir()
            else f"{path}: is a folder; a teacher is a checkpoint or TorchScript file"
        )
    if is_torchscript(path):
        module, teacher_classes, teacher_mean, teacher_std, description = _load_torchscript(path)
        kind = "torchscript"
    else:
        loaded = load_model(path)
        module, teacher_classes, teacher_mean, teacher_std = loaded.model, loaded.classes, loaded.mean, loaded.std
        config = loaded.config
        description = (
            f"UNetStudent base {config.base_channels}, depth {config.depth}, {config.block_order}, {config.upsample}"
        )
        kind = "checkpoint"
    if list(teacher_classes) != list(classes):
        raise CheckpointError(
            f"{path}: the teacher predicts classes {list(teacher_classes)}, the student {list(classes)}"
        )
    for name, theirs, ours in (("mean", teacher_mean, mean), ("std", teacher_std, std)):
        if len(theirs) != len(ours) or not all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(theirs, ours)
        ):
            raise CheckpointError(
                f"{path}: the teacher normalises with {name} {list(theirs)}, the student with {list(ours)}"
            )
    _check_shapes(module, len(classes), path)
    module = module.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return Teacher(FrozenTeacher(module), path, sha256_file(path), kind, description)


def load_teachers(
    teacher: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    classes: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    *,
    channels_last: bool = False,
) -> Teacher:
    """`load_teacher` of one file; of several, each loaded and checked, then their `TeacherEnsemble`."""
    files = teacher_files(teacher)
    if len(files) == 1:
        return load_teacher(files[0], classes, mean, std, device, channels_last=channels_last)
    seen: set[Path] = set()
    for path in files:
        if path.resolve() in seen:
            raise CheckpointError(f"{path}: given twice as a teacher; an ensemble's members are different files")
        seen.add(path.resolve())
    members = tuple(load_teacher(p, classes, mean, std, device, channels_last=channels_last) for p in files)
    kinds = Counter(member.description for member in members)
    description = f"ensemble of {len(members)}: " + "; ".join(
        f"{count} x {text}" if count > 1 else text for text, count in kinds.items()
    )
    ensemble = TeacherEnsemble([member.model.module for member in members])
    digest = ensemble_digest([member.sha256 for member in members])
    return Teacher(FrozenTeacher(ensemble), files[0], digest, "ensemble", description, members)


def check_same_teacher(
    recorded: dict[str, Any] | None,
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    source: str,
) -> None:
    """Refuse to resume `source` (a checkpoint) with a teacher other than the one recorded in it (by sha256; an
    ensemble's members the same files in the same order)."""
    files = teacher_files(path)
    if recorded is None:
        if files:
            raise TrainingError(f"{source}: this run trained without a teacher; drop --teacher or start a new run")
        return
    was = ", ".join(str(p) for p in teacher_files(recorded["path"]))
    missing = next((p for p in files if not p.is_file()), None)
    if not files or missing is not None:
        where = missing if missing is not None else was
        raise CheckpointError(
            f"{where}: teacher not found; {source} was distilled from {was}: pass its new location with --teacher"
        )
    digest = ensemble_digest([sha256_file(p) for p in files])
    if digest != recorded["sha256"]:
        given = ", ".join(str(p) for p in files)
        raise TrainingError(
            f"{given}: not the teacher {source} was trained with (sha256 {digest[:12]}..., the run's is "
            f"{recorded['sha256'][:12]}... from {was}); a resumed run keeps its teacher"
        )
