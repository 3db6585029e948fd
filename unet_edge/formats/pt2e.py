"""PT2E int8 conversion, shared by the formats that quantise through torchao (ExecuTorch, LiteRT, pt2)."""

from __future__ import annotations

from typing import Any

__all__ = ["convert_pt2e", "has_conv_batchnorm"]


def has_conv_batchnorm(graph_module: Any) -> bool:
    """Whether a BatchNorm node of the graph takes a convolution's output directly (what a conv-BN fold can match)."""
    from torch.fx import Node
    from torchao.quantization.pt2e.utils import _is_bn_node, _is_conv_or_conv_transpose_node

    return any(
        _is_bn_node(node) and isinstance(node.args[0], Node) and _is_conv_or_conv_transpose_node(node.args[0])
        for node in graph_module.graph.nodes
    )


def convert_pt2e(prepared: Any, **kwargs: Any) -> Any:
    """torchao's `convert_pt2e`, without its QAT conv-BatchNorm fold pass where it cannot match anything.

    That pass runs whenever the graph holds a BatchNorm, and first traces a dozen pattern graphs with
    torch.export (about 20 s on a 2-core CPU, each call). In the seed's conv -> ReLU -> BatchNorm order no
    BatchNorm follows a convolution, so the pass leaves the graph as it was: it is skipped then."""
    from torchao.quantization.pt2e import quantize_pt2e

    if has_conv_batchnorm(prepared):
        return quantize_pt2e.convert_pt2e(prepared, **kwargs)
    fold = quantize_pt2e._fold_conv_bn_qat
    quantize_pt2e._fold_conv_bn_qat = lambda model: model
    try:
        return quantize_pt2e.convert_pt2e(prepared, **kwargs)
    finally:
        quantize_pt2e._fold_conv_bn_qat = fold
