"""Segmentation metrics: one confusion matrix accumulated with `torch.bincount`, IoU from it.

A class absent from both prediction and target (outside ignored pixels) has no defined IoU:
it is reported as NaN and left out of the mean, as in torchvision's reference scripts.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ConfusionMatrix", "IoU", "iou_from_confusion"]


def _confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        keep &= target != ignore_index
    valid_target = keep & (target >= 0) & (target < num_classes)
    if bool((keep & ~valid_target).any()):
        bad = torch.unique(target[keep & ~valid_target])[:5].tolist()
        raise ValueError(f"target holds class ids outside 0..{num_classes - 1}: {bad}")
    pred, target = pred[keep], target[keep]
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"prediction holds class ids outside 0..{num_classes - 1}")
    index = target * num_classes + pred
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-class IoU (NaN for classes absent from both sides) and their mean over defined classes."""
    matrix = matrix.double()
    true_positive = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - true_positive
    per_class = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, math.nan))
    defined = ~per_class.isnan()
    mean = float(per_class[defined].mean()) if bool(defined.any()) else math.nan
    return per_class, mean


def IoU(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> tuple[torch.Tensor, float]:
    """Per-class IoU and mean IoU of class-index maps `pred` and `target` (same shape).

    Pixels where `target == ignore_index` count for nothing. Returns ``(per_class, miou)``:
    a float64 tensor of length `num_classes` (NaN where a class is in neither map) and a float.
    """
    return iou_from_confusion(_confusion(pred, target, num_classes, ignore_index))


class ConfusionMatrix:
    """Accumulates a K x K confusion matrix (rows: target, columns: prediction) over many batches.

    The matrix lives on `device`, or else on the device of the first batch it sees, so a GPU
    evaluation copies nothing per batch; `reduce_from_all_processes` sums it over a process group.
    """

    def __init__(
        self, num_classes: int, ignore_index: int | None = None, device: torch.device | str | None = None
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self._follow_input = device is None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        counts = _confusion(pred.detach(), target.detach(), self.num_classes, self.ignore_index)
        if self._follow_input:
            self.matrix = self.matrix.to(counts.device)
            self._follow_input = False
        self.matrix += counts.to(self.matrix.device)

    def accumulate(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a training batch without the checks of `update`, and without waiting for the device: its labels
        were checked when the dataset was scanned, so a target outside 0..K-1 (the ignore index, crop padding)
        is a pixel that counts for nothing. The matrix must live on the batch's device."""
        pred, target = pred.detach().reshape(-1), target.detach().reshape(-1).long()
        keep = (target >= 0) & (target < self.num_classes)
        # index_add_ rather than bincount, which reads the largest index back to the host on CUDA
        index = torch.where(keep, target * self.num_classes + pred.long(), 0)
        self.matrix.view(-1).index_add_(0, index, keep.long())

    def reduce_from_all_processes(self) -> None:
        """Sum the matrix over every process of the default group (nothing to do outside one)."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return
        dist.all_reduce(self.matrix)

    def compute(self) -> tuple[torch.Tensor, float]:
        return iou_from_confusion(self.matrix)

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum())
        return float(self.matrix.diag().sum()) / total if total else math.nan
