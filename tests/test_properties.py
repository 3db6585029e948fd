"""Property tests: IoU's range, symmetry and ignore handling; UNetStudent's any-size output."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from unet_edge.metrics import IoU
from unet_edge.model import ModelConfig, build_model

IGNORE = 255


@st.composite
def label_pairs(draw, with_ignore: bool):
    """(pred, target, num_classes): two class maps of one random shape; target may hold IGNORE pixels."""
    num_classes = draw(st.integers(1, 5))
    shape = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    pred = draw(arrays(np.int64, shape, elements=st.integers(0, num_classes - 1)))
    target_values = st.sampled_from([*range(num_classes), IGNORE]) if with_ignore else st.integers(0, num_classes - 1)
    target = draw(arrays(np.int64, shape, elements=target_values))
    return torch.from_numpy(pred), torch.from_numpy(target), num_classes


def same_iou(a: tuple[torch.Tensor, float], b: tuple[torch.Tensor, float]) -> bool:
    (per_a, mean_a), (per_b, mean_b) = a, b
    return torch.allclose(per_a, per_b, equal_nan=True) and (
        (math.isnan(mean_a) and math.isnan(mean_b)) or math.isclose(mean_a, mean_b, abs_tol=1e-12)
    )


@settings(max_examples=60, deadline=None)
@given(label_pairs(with_ignore=True))
def test_iou_is_in_unit_interval_or_nan(case):
    pred, target, num_classes = case
    per_class, miou = IoU(pred, target, num_classes, IGNORE)
    assert per_class.shape == (num_classes,)
    defined = per_class[~per_class.isnan()]
    assert bool(((defined >= 0) & (defined <= 1)).all())
    assert math.isnan(miou) == (defined.numel() == 0)
    if not math.isnan(miou):
        assert 0.0 <= miou <= 1.0


@settings(max_examples=60, deadline=None)
@given(label_pairs(with_ignore=False))
def test_iou_is_symmetric_in_prediction_and_target(case):
    pred, target, num_classes = case
    assert same_iou(IoU(pred, target, num_classes), IoU(target, pred, num_classes))


@settings(max_examples=60, deadline=None)
@given(label_pairs(with_ignore=True), st.data())
def test_ignored_pixels_have_no_effect(case, data):
    pred, target, num_classes = case
    ignored = target == IGNORE
    reference = IoU(pred, target, num_classes, IGNORE)
    # Whatever the prediction says on ignored pixels, the result is the same...
    other = torch.from_numpy(data.draw(arrays(np.int64, tuple(pred.shape), elements=st.integers(0, num_classes - 1))))
    assert same_iou(reference, IoU(torch.where(ignored, other, pred), target, num_classes, IGNORE))
    # ...and it equals the IoU of the kept pixels alone.
    assert same_iou(reference, IoU(pred[~ignored], target[~ignored], num_classes, IGNORE))


@settings(max_examples=12, deadline=None)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    depth=st.integers(1, 3),
    base_channels=st.integers(2, 4),
    upsample=st.sampled_from(["transpose", "bilinear"]),
)
def test_model_output_has_the_input_size(height, width, depth, base_channels, upsample):
    model = build_model(ModelConfig(num_classes=3, base_channels=base_channels, depth=depth, upsample=upsample)).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, height, width))
    assert logits.shape == (1, 3, height, width)
    assert bool(torch.isfinite(logits).all())
