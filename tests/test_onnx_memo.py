"""The suite's ONNX memo (tests/onnx_memo.py) reuses a graph only for the same module and exporter arguments."""

from __future__ import annotations

import onnx_memo
import pytest
import torch
from torch.export import Dim

from unet_edge.model import UNetStudent


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return UNetStudent(num_classes=3, base_channels=4, depth=2).eval()


def _arguments(max_batch: int = 8) -> tuple[tuple[torch.Tensor], dict]:
    shapes = ({0: Dim("batch", min=1, max=max_batch)},)
    return (torch.zeros(2, 3, 32, 32),), {"dynamo": True, "dynamic_shapes": shapes, "opset_version": 18}


def test_the_key_is_the_same_for_the_same_weights_and_arguments_only():
    args, kwargs = _arguments()
    key = onnx_memo._key(_model(), args, kwargs)
    assert onnx_memo._key(_model(), args, kwargs) == key  # another object, the same module
    assert onnx_memo._key(_model(seed=1), args, kwargs) != key  # other weights
    assert onnx_memo._key(_model().train(), args, kwargs) != key  # training mode
    assert onnx_memo._key(_model(), *_arguments(max_batch=4)) != key  # other dynamic-shape bounds
    assert onnx_memo._key(_model(), (torch.zeros(2, 3, 32, 48),), kwargs) != key  # another sample shape
    assert onnx_memo._key(_model(), args, {**kwargs, "opset_version": 17}) != key
    changed = _model()
    changed.some_flag = True  # a plain attribute forward might read
    assert onnx_memo._key(changed, args, kwargs) != key


def test_a_module_with_a_hook_or_an_unknown_attribute_is_never_memoised():
    args, kwargs = _arguments()
    hooked = _model()
    hooked.register_forward_hook(lambda *_: None)
    with pytest.raises(onnx_memo._Unique):
        onnx_memo._key(hooked, args, kwargs)
    odd = _model()
    odd.transform = lambda x: x  # a callable: what it does is not in the key
    with pytest.raises(onnx_memo._Unique):
        onnx_memo._key(odd, args, kwargs)
