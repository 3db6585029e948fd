"""Open any model file unet-edge knows as a `Backend`: a checkpoint (PyTorch eager) or an artifact of a
registered format (`unet_edge.formats`).

A `Backend` turns a batch of normalised float32 N x 3 x H x W images into N x K x H x W logits
(`predict_logits`) and hands bench a device-resident runner. verify, bench and predict all go through
`open_backend`: a file listed in a manifest.json is sha256-checked before it runs, and a provider the
file's runtime does not support is refused with one line instead of running somewhere else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .artifact import check_manifest_sha256
from .errors import ArtifactError
from .formats import FORMATS, Backend, Provider, detect_format
from .formats.onnx import ort_provider_status
from .quiet import third_party_output
from .formats.torchscript import TORCH_PROVIDERS, TorchBackend, archive_names, torch_unavailable

__all__ = ["CHECKPOINT", "artifact_format", "open_backend", "ort_provider_status", "provider_unavailable", "runtime_of", "supports"]

CHECKPOINT = "checkpoint"


def artifact_format(path: str | os.PathLike[str]) -> str:
    """A registered format's name ('onnx', 'torchscript', ...) or 'checkpoint', from the file's content
    where the format allows (not only its name)."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path}: is a folder, expected a model file (.onnx, .ts or a checkpoint)")
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    fmt = detect_format(path)
    if fmt is not None:
        return fmt.name
    names = archive_names(path)
    if names is not None:
        if any(name.endswith("data.pkl") for name in names):
            return CHECKPOINT
        raise ArtifactError(f"{path}: a zip archive that is neither a TorchScript model nor a checkpoint")
    suffixes = ", ".join(s for fmt in FORMATS.values() for s in fmt.suffixes[:1])
    raise ArtifactError(f"{path}: unsupported model file (expected {suffixes} or a checkpoint)")


def runtime_of(kind: str, provider: Provider) -> tuple[str, str]:
    """(runtime name, the runtime's provider name) that a file of `kind` runs on, as reports show them."""
    if kind == CHECKPOINT:
        return "pytorch", TORCH_PROVIDERS.get(provider, provider.value)
    fmt = FORMATS[kind]
    return fmt.runtime, fmt.providers.get(provider, provider.value)


def provider_unavailable(kind: str, provider: Provider) -> str | None:
    """Why a file of `kind` cannot run on `provider` on this machine (None: it can)."""
    if kind == CHECKPOINT:
        return torch_unavailable(provider)
    return FORMATS[kind].unavailable(provider)


def supports(kind: str, provider: Provider) -> bool:
    """Whether files of `kind` run on `provider` at all (TensorRT applies to ONNX only, for example)."""
    return provider in (TORCH_PROVIDERS if kind == CHECKPOINT else FORMATS[kind].providers)


def _open_checkpoint(path: Path, provider: Provider, threads: int | None) -> Backend:
    import torch

    from .checkpoint import load_model

    if provider not in TORCH_PROVIDERS:
        supported = ", ".join(p.value for p in TORCH_PROVIDERS)
        raise ArtifactError(f"{path}: a PyTorch checkpoint does not run on provider {provider.value!r} (supported: {supported})")
    reason = torch_unavailable(provider)
    if reason:
        raise ArtifactError(f"{path}: {reason}")
    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(path)
    device = TORCH_PROVIDERS[provider]
    return TorchBackend(
        loaded.model,
        device=device,
        channels_last=device == "cuda",
        backend="pytorch",
        provider=device,
        precision="fp32",
        path=path,
        classes=loaded.classes,
        mean=loaded.mean,
        std=loaded.std,
        ignore_index=loaded.ignore_index,
        meta={"checkpoint": loaded.state},
        model_config=dict(loaded.state["config"]),
    )


def open_backend(
    path: str | os.PathLike[str], provider: Provider | str = Provider.CPU, threads: int | None = None, entry: dict[str, Any] | None = None
) -> Backend:
    """Load a checkpoint or an artifact of any registered format for `provider`.

    An artifact is first checked against `entry` (its manifest entry, when the caller has it) or the
    manifest.json beside it: a sha256 mismatch is refused before anything runs the file.
    """
    path = Path(path)
    try:
        provider = Provider(provider)
    except ValueError:
        raise ArtifactError(f"unknown provider {provider!r}: use {', '.join(p.value for p in Provider)}") from None
    kind = artifact_format(path)
    if kind == CHECKPOINT:
        return _open_checkpoint(path, provider, threads)
    entry = check_manifest_sha256(path, entry)
    with third_party_output(f"opening {path.name}"):  # runtimes log their set-up (delegates, CPU probing) on stderr
        return FORMATS[kind].open(path, provider, threads, entry)
