"""PT2E int8 conversion, shared by the formats that quantise through torchao (ExecuTorch, LiteRT, pt2), and
the torch.export trace their float export and int8 variant share."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["convert_pt2e", "exported_once", "has_conv_batchnorm"]

# torch.export of a module, kept for the float export and the int8 variant's prepare step of the same export (one
# trace instead of two): by module, which the request holds for the whole export, and by the trace's settings.
_PROGRAMS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def exported_once(module: Any, key: str, export: Callable[[Any], Any]) -> Any:
    """`export(module)` (a torch.export ExportedProgram), traced once per module and `key` (what else the trace
    depends on, e.g. its shape bounds). Its users read it through `.module()` or lower it, which leave it as it
    was, so one program serves the float export and the int8 variant's calibration."""
    programs = _PROGRAMS.setdefault(module, {})
    if key not in programs:
        programs[key] = export(module)
    return programs[key]


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
