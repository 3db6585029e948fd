import math

import numpy as np
import pytest
import torch

from unet_edge.metrics import ConfusionMatrix, IoU


def test_hand_computed_iou():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    per_class, miou = IoU(pred, target, num_classes=2)
    # class 0: tp=3, fp=1, fn=1 -> 3/5; class 1: tp=3, fp=1, fn=1 -> 3/5
    assert per_class.tolist() == pytest.approx([0.6, 0.6])
    assert miou == pytest.approx(0.6)


def test_ignore_index_pixels_count_for_nothing():
    target = torch.tensor([0, 1, 255, 255])
    pred = torch.tensor([0, 1, 1, 0])
    per_class, miou = IoU(pred, target, num_classes=2, ignore_index=255)
    assert per_class.tolist() == [1.0, 1.0]
    assert miou == 1.0
    with pytest.raises(ValueError, match="outside"):
        IoU(pred, target, num_classes=2)  # without the ignore index, 255 is an unknown class


def test_absent_class_is_nan_and_left_out_of_mean():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 1, 1, 1])
    per_class, miou = IoU(pred, target, num_classes=3)
    assert per_class[:2].tolist() == pytest.approx([0.5, 2 / 3])
    assert math.isnan(per_class[2])
    assert miou == pytest.approx((0.5 + 2 / 3) / 2)


def test_class_only_in_prediction_scores_zero():
    per_class, _ = IoU(torch.tensor([2, 0]), torch.tensor([0, 0]), num_classes=3)
    assert per_class[2] == 0.0 and per_class[0] == 0.5


def test_confusion_over_batches_equals_iou_of_concatenation():
    generator = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 4, (2, 9, 7), generator=generator) for _ in range(5)]
    targets = [torch.randint(0, 4, (2, 9, 7), generator=generator) for _ in range(5)]
    for t in targets:
        t[t == 3] = 255
    matrix = ConfusionMatrix(4, ignore_index=255)
    for p, t in zip(preds, targets):
        matrix.update(p, t)
    per_class, miou = matrix.compute()
    expected_per_class, expected_miou = IoU(torch.cat(preds), torch.cat(targets), 4, ignore_index=255)
    torch.testing.assert_close(per_class, expected_per_class, equal_nan=True)
    assert miou == pytest.approx(expected_miou)
    # and it is not the mean of per-batch mIoUs
    batch_mean = sum(IoU(p, t, 4, 255)[1] for p, t in zip(preds, targets)) / 5
    assert miou != pytest.approx(batch_mean, abs=1e-9)


def test_accumulate_counts_training_batches_as_update_does_and_skips_padding_and_the_ignore_index():
    """The running train mIoU's path: no checks, and targets outside 0..K-1 (255, crop padding) count for nothing."""
    generator = torch.Generator().manual_seed(1)
    checked, running = ConfusionMatrix(4, ignore_index=255), ConfusionMatrix(4)
    for _ in range(4):
        pred = torch.randint(0, 4, (2, 9, 7), generator=generator)
        target = torch.randint(0, 4, (2, 9, 7), generator=generator)
        target[0, :2] = 255
        padded = torch.cat([target, torch.full((2, 9, 3), -100)], dim=-1)  # crop padding beside the image
        checked.update(pred, target)
        running.accumulate(torch.cat([pred, torch.randint(0, 4, (2, 9, 3), generator=generator)], dim=-1), padded)
    assert torch.equal(running.matrix, checked.matrix) and int(running.matrix.sum()) == 4 * (2 * 9 * 7 - 14)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        IoU(torch.zeros(2, 2), torch.zeros(2, 3), 2)


def test_confusion_matrix_reduce_outside_a_process_group_keeps_the_counts():
    confusion = ConfusionMatrix(3, ignore_index=255)
    confusion.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 1, 255]]))
    confusion.reduce_from_all_processes()
    assert confusion.matrix.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    assert confusion.pixel_accuracy() == pytest.approx(2 / 3)


def test_parity_miou_over_a_set_of_images_equals_one_update_per_image():
    """parity counts every image's pixels in one update; the matrix must be the per-image sum, ignore band included."""
    from unet_edge.parity import _miou

    rng = np.random.default_rng(0)
    shapes = [(17, 23), (32, 32), (5, 40)]
    preds = [rng.integers(0, 4, shape) for shape in shapes]
    targets = [np.where(rng.random(shape) < 0.1, 255, rng.integers(0, 4, shape)) for shape in shapes]
    matrix = ConfusionMatrix(4, 255)
    for pred, target in zip(preds, targets, strict=True):
        matrix.update(torch.from_numpy(pred), torch.from_numpy(target))
    assert _miou(preds, targets, 4, 255) == matrix.compute()[1]
    with pytest.raises(ValueError, match="differs from target shape"):
        _miou([preds[0]], [targets[1]], 4, 255)
