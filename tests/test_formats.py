"""One test base for every registered format: the session's `--format all` export of the tiny checkpoint, checked
format by format (its file and manifest entry, eager parity, verify, predict agreement, refusal of damaged and
missing files, the message when its extra is not installed). The test_format_*.py files keep what one format alone
has."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unet_edge.backends import open_backend
from unet_edge.checkpoint import load_model
from unet_edge.formats import FORMATS, Format, Provider, detect_format, export_formats
from unet_edge.io import sha256_file

ODD = "odd_mask.png"  # the 97 x 131 image among the tiny validation images (48 x 48)
VERIFY_FIELDS = {
    "path",
    "format",
    "precision",
    "max_abs_diff",
    "mean_abs_diff",
    "pixel_agreement",
    "miou_vs_reference",
    "miou_gt",
    "miou_gt_reference",
    "miou_drop",
    "passed",
}


@pytest.fixture(params=list(export_formats()))
def fmt(request) -> Format:
    """Each registered format; one whose runtime is not installed here is skipped with the reason."""
    fmt = FORMATS[request.param]
    reason = fmt.unavailable(Provider.CPU)
    if reason:
        pytest.skip(reason)
    return fmt


@pytest.fixture(scope="session")
def export_dir(exported_all) -> Path:
    return exported_all[0]


def manifest_entry(folder: Path, fmt: Format) -> dict:
    (entry,) = [e for e in json.loads((folder / "manifest.json").read_text())["artifacts"] if e["format"] == fmt.name]
    return entry


@pytest.fixture(scope="session")
def reference_masks(tiny_checkpoint, predicted_masks) -> dict[str, np.ndarray]:
    """The checkpoint's own masks, checked to hold two classes or more on the validation images: against a model
    that predicts one class, an artifact predicting that class everywhere would agree perfectly."""
    masks = predicted_masks(tiny_checkpoint)
    classes = np.unique(np.concatenate([mask.ravel() for name, mask in masks.items() if name != ODD]))
    assert len(classes) >= 2, f"the tiny checkpoint predicts only class {classes.tolist()} on the validation images"
    return masks


@pytest.mark.slow
def test_export_writes_the_file_and_its_manifest_entry(fmt, export_dir):
    entry = manifest_entry(export_dir, fmt)
    path = export_dir / fmt.file
    assert entry["file"] == fmt.file and detect_format(path) is fmt
    assert entry["sha256"] == sha256_file(path) and entry["size_bytes"] == path.stat().st_size
    for companion in entry.get("companions", []):
        assert companion["sha256"] == sha256_file(export_dir / companion["file"])
    assert entry["precision"] == "fp32" and entry["parity"]["passed"] is True
    assert entry["inputs"][0]["name"] == "image" and entry["outputs"][0]["name"] == "logits"


@pytest.mark.slow
@pytest.mark.parametrize("size", [(97, 131), (40, 72)])
def test_logits_agree_with_eager(fmt, export_dir, tiny_checkpoint, size):
    """Each format opens through its backend and matches eager (fixed-size formats at their export size, whatever
    `size` says)."""
    if not fmt.dynamic_size:
        size = tuple(manifest_entry(export_dir, fmt)["size_contract"]["fixed"])
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_model(tiny_checkpoint).model(x)
    backend = open_backend(export_dir / fmt.file)
    assert backend.backend == fmt.runtime and backend.precision == "fp32"
    logits = backend.predict_logits(x.numpy())
    assert logits.shape == (3, 4, *size)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_verify_passes(fmt, export_dir, tmp_path, cli):
    report_path = tmp_path / "verify.json"
    result = cli("verify", str(export_dir / fmt.file), "--json", str(report_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all artifacts pass" in result.stdout
    report = json.loads(report_path.read_text())
    (entry,) = report["artifacts"]
    assert report["passed"] is True and set(entry) >= VERIFY_FIELDS and entry["format"] == fmt.name
    assert entry["pixel_agreement"] >= 0.999 and entry["max_abs_diff"] < 1e-3


@pytest.mark.slow
def test_predict_masks_agree_with_the_checkpoint(fmt, export_dir, reference_masks, predicted_masks, agreement):
    candidate = predicted_masks(export_dir / fmt.file)
    assert candidate.keys() == reference_masks.keys() and len(candidate) == 7
    assert candidate[ODD].shape == (97, 131)
    same_size = [name for name in sorted(reference_masks) if name != ODD]
    flat = [np.concatenate([masks[name].ravel() for name in same_size]) for masks in (candidate, reference_masks)]
    assert len(np.unique(flat[0])) >= 2
    assert agreement(*flat) >= 0.999
    # A fixed-size format tiles other sizes and tile borders see zeros instead of the image: bounded, not exact.
    assert agreement(candidate[ODD], reference_masks[ODD]) >= (0.999 if fmt.dynamic_size else 0.95)


def refusing_commands(model: Path, image: Path, out: Path) -> dict[str, list[str]]:
    """verify, predict and bench of `model`, each writing under `out` if it ran."""
    return {
        "verify": ["verify", str(model), "--json", str(out / "verify.json")],
        "predict": ["predict", str(model), str(image), "--out", str(out / "masks")],
        "bench": ["bench", str(model), "--providers", "cpu", "--iters", "1", "--json", str(out / "bench.json")],
    }


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tampered", "truncated", "missing"])
def test_a_damaged_or_missing_file_is_refused_in_one_line(
    how, fmt, export_dir, odd_image, tmp_path, cli, one_line_error, damaged_copy
):
    """Every file of the artifact (the model and the companions its manifest entry lists), damaged in a copy of
    the export: verify, predict and bench each refuse it in one line naming the file, and write nothing."""
    entry = manifest_entry(export_dir, fmt)
    for file in [fmt.file, *(c["file"] for c in entry.get("companions", []))]:
        copy = tmp_path / f"{how}-{file}"
        damaged_copy(export_dir, file, copy, how)
        if how == "missing":
            message = ["file not found"] if file == fmt.file else ["listed in manifest.json but missing"]
        else:  # the manifest names the format, so even one known by its content gets the sha256 verdict
            message = [f"{file}: sha256", "modified" if how == "tampered" else "truncated"]
        out = tmp_path / f"out-{file}"
        for command, args in refusing_commands(copy / fmt.file, odd_image, out).items():
            line = one_line_error(cli(*args), *message)
            assert file in line, (command, line)
            assert not out.exists(), command


def block_runtime(fmt: Format, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the packages `fmt.unavailable` imports unimportable, as when they are not installed (None in
    sys.modules, submodules already loaded included); returns their names. The packages are those the format
    asks for, recorded, so that this test names no runtime module itself."""
    asked: list[str] = []
    real_import = importlib.import_module

    def recording_import(module: str, package: str | None = None):
        asked.append(module)
        return real_import(module, package)

    with monkeypatch.context() as recording:
        recording.setattr(importlib, "import_module", recording_import)
        fmt.unavailable(Provider.CPU)
    assert asked, f"{fmt.name}: its unavailable() imports nothing through importlib"
    for module in asked:
        for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, module, None)
    return asked


@pytest.mark.parametrize("name", list(export_formats()))
def test_a_missing_runtime_names_its_extra(name, monkeypatch):
    """Whether or not the extra is installed here: a format whose runtime cannot be imported says which extra to
    install."""
    fmt = FORMATS[name]
    if fmt.extra is None:
        pytest.skip(f"{name} is a core dependency (no extra)")
    first, *_ = block_runtime(fmt, monkeypatch)
    assert fmt.unavailable(Provider.CPU) == f"{first} is not installed: pip install 'unet-edge[{fmt.extra}]'"


@pytest.mark.slow
def test_opening_or_exporting_without_the_runtime_names_its_extra(
    fmt, export_dir, tiny_checkpoint, odd_image, tmp_path, monkeypatch, cli, one_line_error
):
    """verify and predict of its file and an export to it each stop at the missing runtime with one line, writing
    nothing."""
    if fmt.extra is None:
        pytest.skip(f"{fmt.name} is a core dependency (no extra)")
    block_runtime(fmt, monkeypatch)
    out = tmp_path / "out"
    commands = refusing_commands(export_dir / fmt.file, odd_image, out)
    commands["export"] = ["export", str(tiny_checkpoint), "--format", fmt.name, "--out", str(out / "exported")]
    for command in ("verify", "predict", "export"):
        line = one_line_error(cli(*commands[command]), f"is not installed: pip install 'unet-edge[{fmt.extra}]'")
        assert re.match(rf"error: [\w.]+ is not installed: pip install 'unet-edge\[{fmt.extra}\]'(;|$)", line), line
        assert not out.exists(), command
