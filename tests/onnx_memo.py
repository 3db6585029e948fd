"""The suite's ONNX graphs, traced once per test process and module.

`torch.onnx.export` (torch.export, then the ONNX translation) takes 3 to 7 s per call here, and about thirty tests
export the same tiny checkpoint to ONNX with the same options only to get a file to verify, quantise, bench or
damage: a fifth of the suite's CPU time. `install()` puts a memo in front of it: the first call for a given module
(its classes, plain attributes, weights and buffers) and arguments runs the real exporter; a later identical
call in the same process gets a copy of that call's graph (`model_proto`, the only part unet-edge reads). Everything
after the trace (folding, metadata, saving, quantisation, fp16 conversion, parity) still runs for every export, and
so does every export in a subprocess (the `--format all` export, deploy's and search's workers, gpu_check).
Anything the key cannot be sure of (a hook, a callable attribute, an object it does not know how to hash, a tensor
it cannot read as bytes) makes the call unique, so it is traced.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
from types import SimpleNamespace
from typing import Any

import markers

_graphs: dict[str, Any] = {}
_PLAIN = (bool, int, float, str, bytes, type(None))


class _Unique(Exception):
    """The call cannot be keyed safely: trace it."""


def _update(digest: Any, value: Any) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, _PLAIN):
        digest.update(f"{type(value).__name__} {value!r}".encode())
    elif isinstance(value, set | frozenset):
        _update(digest, sorted(value, key=repr))
    elif isinstance(value, (tuple, list)):
        digest.update(f"{type(value).__name__} {len(value)}".encode())
        for item in value:
            _update(digest, item)
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}".encode())
        for key in sorted(value, key=repr):
            _update(digest, key)
            _update(digest, value[key])
    elif isinstance(value, torch.dtype | torch.device | enum.Enum):
        digest.update(f"{type(value).__qualname__} {value!r}".encode())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(f"dataclass {type(value).__module__}.{type(value).__qualname__}".encode())
        _update(digest, {field.name: getattr(value, field.name) for field in dataclasses.fields(value)})
    elif type(value).__module__.startswith("torch.export"):  # dynamic-shape specs: their name and bounds
        digest.update(f"{type(value).__qualname__} {value!r}".encode())
        plain = {k: v for k, v in vars(value).items() if isinstance(v, _PLAIN)} if hasattr(value, "__dict__") else {}
        _update(digest, plain)
    else:
        raise _Unique(type(value).__qualname__)


def _key(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    import torch

    if not isinstance(module, torch.nn.Module):
        raise _Unique(type(module).__qualname__)
    digest = hashlib.sha256()
    for name, sub in module.named_modules():
        digest.update(f"module {name} {type(sub).__module__}.{type(sub).__qualname__}".encode())
        for attr, value in sorted(vars(sub).items()):
            if attr in ("_parameters", "_buffers", "_modules") or (attr.startswith("_") and not value):
                continue
            if "hook" in attr:
                raise _Unique(f"{name}.{attr}")
            _update(digest, attr)
            _update(digest, value)
        for attr, tensor in (*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)):
            _update(digest, attr)
            _update(digest, tensor)
    _update(digest, list(args))
    _update(digest, kwargs)
    return digest.hexdigest()


def install() -> None:
    """Put the memo in front of `torch.onnx.export` (after markers.install, so a real call is still seen as
    export work; a memoised one is noted as the same work)."""
    import onnx
    import torch.onnx

    export = torch.onnx.export

    @functools.wraps(export)
    def memoised(module: Any, args: tuple[Any, ...] = (), *rest: Any, **kwargs: Any) -> Any:
        if rest or kwargs.get("f") is not None or not kwargs.get("dynamo"):
            return export(module, args, *rest, **kwargs)
        try:
            key = _key(module, args, kwargs)
        except Exception:  # _Unique, or a tensor that has no bytes view (quantised, sparse): never memoised
            return export(module, args, **kwargs)
        if key in _graphs:
            markers.note("exports (torch.onnx.export, the graph traced earlier in this process)")
        else:
            program = export(module, args, **kwargs)
            if program is None:
                return program
            _graphs[key] = program.model_proto.SerializeToString()
        proto = onnx.ModelProto()
        proto.ParseFromString(_graphs[key])
        return SimpleNamespace(model_proto=proto)

    torch.onnx.export = memoised
