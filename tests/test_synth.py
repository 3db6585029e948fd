import json

import numpy as np
from PIL import Image

from unet_edge.synth import CLASSES, IGNORE_INDEX, SynthSpec, ensure_synth, write_synth


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    spec = SynthSpec(num_train=5, num_val=2, size=40, seed=11)
    first = _files(write_synth(tmp_path / "a", spec))
    second = _files(write_synth(tmp_path / "b", spec))
    assert first == second
    other = _files(write_synth(tmp_path / "c", SynthSpec(num_train=5, num_val=2, size=40, seed=12)))
    assert other != first


def test_layout_classes_and_ignore_band(tmp_path):
    root = write_synth(tmp_path, SynthSpec(num_train=12, num_val=3, size=48, seed=0))
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["classes"] == list(CLASSES) and len(CLASSES) >= 4 and meta["ignore_index"] == IGNORE_INDEX
    assert len(list((root / "train/images").glob("*.png"))) == 12
    assert len(list((root / "val/labels").glob("*.png"))) == 3
    seen = set()
    for path in (root / "train/labels").glob("*.png"):
        label = np.asarray(Image.open(path))
        assert label.shape == (48, 48)
        seen |= set(np.unique(label).tolist())
    assert seen == set(range(len(CLASSES))) | {IGNORE_INDEX}
    image = np.asarray(Image.open(root / "train/images/00000.png"))
    assert image.shape == (48, 48, 3) and image.std() > 5  # textured, not flat


def test_ensure_synth_generates_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    spec = SynthSpec(num_train=2, num_val=1, size=32)
    root = ensure_synth(spec)
    assert root.is_relative_to(tmp_path / "unet-edge") and (root / "dataset.json").is_file()
    stamp = (root / "dataset.json").stat().st_mtime_ns
    assert ensure_synth(spec) == root and (root / "dataset.json").stat().st_mtime_ns == stamp
