"""Pascal VOC layout: detected beside the folder layout, palette labels read as class ids, trains end to end."""

import json
from pathlib import Path

import pytest
from PIL import Image

from unet_edge.checkpoint import load_checkpoint
from unet_edge.data import VOC_CLASSES, ImageSegmentation, is_voc_root, load_label
from unet_edge.errors import DataError


def voc_palette() -> list[int]:
    """The 256-colour palette of VOC's SegmentationClass PNGs (bit-interleaved class colours, 255 = cream)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [r, g, b]
    return palette


def make_voc(source: Path, root: Path) -> Path:
    """Rewrite a folder-layout dataset as VOC: JPEG images, palette PNG labels, split lists."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in ("train", "val"):
        ids = []
        for image_path in sorted((source / split / "images").iterdir()):
            image_id = f"2007_{split}_{image_path.stem}"
            Image.open(image_path).convert("RGB").save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            label = Image.fromarray(load_label(source / split / "labels" / f"{image_path.stem}.png"), mode="P")
            label.putpalette(voc_palette())
            label.save(root / "SegmentationClass" / f"{image_id}.png")
            ids.append(image_id)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture(scope="module")
def voc_data(tiny_data, tmp_path_factory) -> Path:
    return make_voc(tiny_data, tmp_path_factory.mktemp("voc") / "VOC2012")


def test_voc_layout_is_detected_and_palette_indices_are_class_ids(voc_data, tiny_data):
    assert is_voc_root(voc_data) and not is_voc_root(tiny_data)
    dataset = ImageSegmentation(voc_data, "val")
    folder = ImageSegmentation(tiny_data, "val")
    assert dataset.layout == "voc" and folder.layout == "folder"
    assert len(dataset) == len(folder) == 6
    assert dataset.info.classes == VOC_CLASSES and len(VOC_CLASSES) == 21 and dataset.info.ignore_index == 255
    image, mask = dataset[0]
    _, expected = folder[0]
    assert image.shape == (3, 48, 48)
    assert mask.tolist() == expected.tolist()  # class ids and the 255 border, not palette colours
    assert 255 in mask.unique().tolist()


def test_voc_missing_split_list_names_the_file(voc_data):
    with pytest.raises(DataError, match=r"ImageSets/Segmentation/trainval\.txt: split list not found"):
        ImageSegmentation(voc_data, "trainval")


def test_voc_listed_image_without_file_names_it(voc_data, tmp_path):
    root = tmp_path / "VOC"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "JPEGImages" / "a.jpg")
    Image.new("P", (8, 8)).save(root / "SegmentationClass" / "a.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    with pytest.raises(DataError) as info:
        ImageSegmentation(root, "train")
    message = str(info.value)
    assert message.startswith(str(root / "JPEGImages" / "b.jpg")) and "\n" not in message


@pytest.mark.slow
def test_voc_layout_trains_and_evaluates(voc_data, tmp_path, cli, trainer):
    result = trainer(voc_data, tmp_path, name="voc", epochs=1)
    state = load_checkpoint(result.run_dir / "best.pt")
    assert state["classes"] == list(VOC_CLASSES) and state["config"]["num_classes"] == 21
    assert state["ignore_index"] == 255
    record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= record["miou"] <= 1.0 and set(record["per_class_iou"]) == set(VOC_CLASSES)
    report_path = tmp_path / "eval.json"
    evaluated = cli(
        "eval", str(result.run_dir / "best.pt"), "--data", str(voc_data), "--device", "cpu", "--json", str(report_path)
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(report_path.read_text())["miou"] == pytest.approx(record["miou"], abs=1e-9)
