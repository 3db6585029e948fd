"""Open any model file unet-edge knows as a `Backend`: a file of any registered format (`unet_edge.formats`),
the training checkpoint included.

A `Backend` turns a batch of normalised float32 N x 3 x H x W images into N x K x H x W logits
(`predict_logits`) and hands bench a device-resident runner. verify, bench and predict all go through
`open_backend`: a file listed in a manifest.json is sha256-checked before it runs, and a provider the
file's runtime does not support is refused with one line instead of running somewhere else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .artifact import check_manifest_sha256, manifest_entry
from .errors import ArtifactError
from .formats import FORMATS, Backend, Provider, detect_format
from .formats.onnx import ort_provider_status
from .quiet import third_party_output

__all__ = ["artifact_format", "open_backend", "ort_provider_status", "provider_unavailable", "runtime_of", "supports"]


def artifact_format(path: str | os.PathLike[str], entry: dict[str, Any] | None = None) -> str:
    """The registered format's name ('onnx', 'torchscript', ..., 'checkpoint') of a model file: the one its manifest
    entry records (`entry`, else read from the manifest.json beside it), else from its content where the format
    allows (not only its name)."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path}: is a folder, expected a model file ({_expected()})")
    if not path.is_file():
        raise ArtifactError(f"{path}: file not found")
    if entry is None:
        entry = manifest_entry(path)[1]
    if entry is not None and entry.get("format") in FORMATS:
        # Listed in a manifest: the format it was exported as (so a damaged file gets the manifest's sha256 verdict
        # when it is opened, rather than whatever its damaged content looks like).
        return entry["format"]
    fmt = detect_format(path)
    if fmt is None:
        raise ArtifactError(f"{path}: unsupported model file (expected {_expected()})")
    return fmt.name


def _expected() -> str:
    return ", ".join(dict.fromkeys(fmt.suffixes[0] for fmt in FORMATS.values()))


def runtime_of(kind: str, provider: Provider) -> tuple[str, str]:
    """(runtime name, the runtime's provider name) that a file of `kind` runs on, as reports show them."""
    fmt = FORMATS[kind]
    return fmt.runtime, fmt.providers.get(provider, provider.value)


def provider_unavailable(kind: str, provider: Provider) -> str | None:
    """Why a file of `kind` cannot run on `provider` on this machine (None: it can)."""
    return FORMATS[kind].unavailable(provider)


def supports(kind: str, provider: Provider) -> bool:
    """Whether files of `kind` run on `provider` at all (TensorRT applies to ONNX only, for example)."""
    return provider in FORMATS[kind].providers


def open_backend(
    path: str | os.PathLike[str],
    provider: Provider | str = Provider.CPU,
    threads: int | None = None,
    entry: dict[str, Any] | None = None,
) -> Backend:
    """Load a model file of any registered format for `provider`.

    A file is first checked against `entry` (its manifest entry, when the caller has it) or the
    manifest.json beside it: a sha256 mismatch is refused before anything runs the file.
    """
    path = Path(path)
    try:
        provider = Provider(provider)
    except ValueError:
        raise ArtifactError(f"unknown provider {provider!r}: use {', '.join(p.value for p in Provider)}") from None
    if entry is None and path.is_file():
        entry = manifest_entry(path)[1]  # read once: it names the format and holds the sha256
    fmt = FORMATS[artifact_format(path, entry)]
    entry = check_manifest_sha256(path, entry)
    with third_party_output(f"opening {path.name}"):  # runtimes log their set-up (delegates, CPU probing) on stderr
        return fmt.open(path, provider, threads, entry)
