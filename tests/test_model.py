import pytest
import torch
from torch import nn

from unet_edge.model import ConvBlockStudent, ModelConfig, UNetStudent, build_model


@pytest.mark.parametrize("size", [(97, 131), (33, 17), (64, 64), (1, 1)])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
@pytest.mark.parametrize("downsample", ["maxpool", "strided"])
def test_any_input_size_gives_same_size_logits(size, upsample, downsample):
    model = UNetStudent(num_classes=5, base_channels=4, depth=3, upsample=upsample, downsample=downsample).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)
    assert torch.isfinite(out).all()


def test_default_depth_four_on_odd_size():
    model = UNetStudent(num_classes=3, base_channels=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 131)).shape == (1, 3, 97, 131)


def _layer_types(block: nn.Module) -> list[type]:
    return [type(m) for m in block]


def test_seed_block_order_is_conv_relu_bn():
    block = ConvBlockStudent(3, 8, num_convs=2)
    assert _layer_types(block) == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d] * 2


def test_conv_bn_relu_block_order():
    block = ConvBlockStudent(3, 8, num_convs=3, block_order="conv-bn-relu")
    assert _layer_types(block) == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3


def test_downsampling_modes_halve_resolution():
    x = torch.randn(1, 3, 16, 16)
    assert ConvBlockStudent(3, 8, downsample="none")(x).shape[-1] == 16
    pooled = ConvBlockStudent(3, 8, downsample="maxpool")
    assert isinstance(pooled[0], nn.MaxPool2d) and pooled(x).shape[-1] == 8
    strided = ConvBlockStudent(3, 8, downsample="strided")
    assert strided[0].stride == (2, 2) and strided(x).shape[-1] == 8


def test_bad_choices_are_rejected():
    with pytest.raises(ValueError, match="downsample"):
        ConvBlockStudent(3, 8, downsample="avg")
    with pytest.raises(ValueError, match="block_order"):
        ConvBlockStudent(3, 8, block_order="bn-conv")
    with pytest.raises(ValueError, match="upsample"):
        UNetStudent(num_classes=2, upsample="nearest")


def test_gradients_reach_first_layer():
    model = UNetStudent(num_classes=3, base_channels=4, depth=2)
    loss = model(torch.randn(2, 3, 20, 27)).square().mean()
    loss.backward()
    first_conv = model.stem[0]
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0


def test_skips_are_concatenated():
    model = UNetStudent(num_classes=2, base_channels=4, depth=2)
    # decoder blocks take twice their output width: upsampled features + the skip
    assert [block[0].in_channels for block in model.decoder] == [16, 8]
    assert model.head.kernel_size == (3, 3)


def test_build_model_from_config_dict_round_trip():
    config = ModelConfig(num_classes=6, base_channels=8, depth=2, upsample="bilinear", block_order="conv-bn-relu")
    model = build_model(config.to_dict())
    assert model.config == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "width": 3})
