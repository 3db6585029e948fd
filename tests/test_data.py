import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from unet_edge.data import ImageSegmentation, load_label, pad_collate, read_dataset_info
from unet_edge.errors import DataError
from unet_edge.transforms import SegmentationPresetEval, SegmentationPresetTrain


def make_dataset(root, pairs, split="train"):
    """pairs: {stem: (image array or None, label array or None)}"""
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "labels").mkdir(parents=True, exist_ok=True)
    for stem, (image, label) in pairs.items():
        if image is not None:
            Image.fromarray(image).save(root / split / "images" / f"{stem}.png")
        if label is not None:
            Image.fromarray(label).save(root / split / "labels" / f"{stem}.png")
    return root


def rgb(h, w, value=0):
    return np.full((h, w, 3), value, np.uint8)


def test_pairs_by_stem_and_returns_tv_tensors(tmp_path):
    make_dataset(
        tmp_path, {"b": (rgb(5, 6, 10), np.ones((5, 6), np.uint8)), "a": (rgb(5, 6, 20), np.zeros((5, 6), np.uint8))}
    )
    dataset = ImageSegmentation(tmp_path, "train")
    assert len(dataset) == 2
    image, mask = dataset[0]
    assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
    assert image.shape == (3, 5, 6) and image.dtype == torch.uint8
    assert mask.shape == (5, 6) and mask.dtype == torch.int64
    assert int(image[0, 0, 0]) == 20 and int(mask.sum()) == 0  # "a" comes first


def test_grayscale_rgba_and_palette_images_become_rgb(tmp_path):
    root = make_dataset(tmp_path, {})
    label = np.zeros((4, 4), np.uint8)
    Image.fromarray(np.full((4, 4), 7, np.uint8), mode="L").save(root / "train/images/g.png")
    Image.fromarray(np.full((4, 4, 4), 9, np.uint8), mode="RGBA").save(root / "train/images/r.png")
    Image.fromarray(np.full((4, 4), 1, np.uint8), mode="L").convert("P").save(root / "train/images/p.png")
    for stem in "grp":
        Image.fromarray(label).save(root / f"train/labels/{stem}.png")
    dataset = ImageSegmentation(root, "train")
    for i in range(3):
        image, _ = dataset[i]
        assert image.shape == (3, 4, 4)


def test_palette_and_16bit_labels_keep_class_indices(tmp_path):
    values = np.array([[0, 1], [2, 255]], np.uint8)
    palette_label = Image.fromarray(values, mode="P")
    palette_label.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
    palette_label.save(tmp_path / "p.png")
    assert load_label(tmp_path / "p.png").tolist() == values.tolist()
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "w.png")
    assert load_label(tmp_path / "w.png").tolist() == values.tolist()
    Image.fromarray(rgb(2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="single-channel"):
        load_label(tmp_path / "rgb.png")


def test_pairing_errors_name_the_file(tmp_path):
    make_dataset(tmp_path / "a", {"x": (rgb(4, 4), None), "y": (rgb(4, 4), np.zeros((4, 4), np.uint8))})
    with pytest.raises(DataError, match=r"x\.png: image has no label"):
        ImageSegmentation(tmp_path / "a", "train")
    make_dataset(tmp_path / "b", {"x": (None, np.zeros((4, 4), np.uint8))})
    with pytest.raises(DataError, match=r"x\.png: label has no image"):
        ImageSegmentation(tmp_path / "b", "train")
    with pytest.raises(DataError, match="folder not found"):
        ImageSegmentation(tmp_path / "missing", "train")
    make_dataset(tmp_path / "c", {})
    with pytest.raises(DataError, match="empty"):
        ImageSegmentation(tmp_path / "c", "train")
    with pytest.raises(DataError, match="val/images: folder not found"):
        ImageSegmentation(tmp_path / "c", "val")


def test_label_of_wrong_size_and_corrupt_image(tmp_path):
    make_dataset(tmp_path, {"x": (rgb(4, 5), np.zeros((4, 4), np.uint8))})
    dataset = ImageSegmentation(tmp_path, "train")
    with pytest.raises(DataError, match=r"x\.png: label is 4x4 but its image is 5x4"):
        dataset[0]
    (tmp_path / "train/images/x.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="not a readable image"):
        dataset[0]


def test_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["bg", "fg"], "ignore_index": 255}))
    info = read_dataset_info(tmp_path)
    assert info.classes == ("bg", "fg") and info.ignore_index == 255 and info.num_classes == 2
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["bg", "fg"], "ignore_index": 1}))
    with pytest.raises(DataError, match="ignore_index"):
        read_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        read_dataset_info(tmp_path)


def _pattern(h, w):
    """An image whose red channel encodes the column and green the row; the mask encodes the column."""
    ys, xs = np.mgrid[0:h, 0:w]
    image = np.stack([xs * 4, ys * 4, np.zeros_like(xs)], 0).astype(np.uint8)
    return tv_tensors.Image(torch.from_numpy(image)), tv_tensors.Mask(torch.from_numpy(xs % 50).long())


@pytest.mark.parametrize("seed", range(6))
def test_flip_and_crop_keep_image_and_mask_aligned(seed):
    torch.manual_seed(seed)
    image, mask = _pattern(30, 40)
    preset = SegmentationPresetTrain(crop_size=24, mean=(0, 0, 0), std=(1, 1, 1))
    out_image, out_mask = preset(image, mask)
    assert out_image.shape == (3, 24, 24) and out_mask.shape == (24, 24)
    column_from_image = torch.round(out_image[0] * 255 / 4).long() % 50
    assert torch.equal(column_from_image, out_mask)


def test_crop_pads_masks_with_ignore_index():
    torch.manual_seed(0)
    image, mask = _pattern(10, 12)
    _out_image, out_mask = SegmentationPresetTrain(crop_size=16, hflip_prob=0.0)(image, mask)
    assert out_mask.shape == (16, 16)
    assert (out_mask == 255).sum() == 16 * 16 - 10 * 12
    assert set(torch.unique(out_mask).tolist()) - {255} <= set(range(12))


def test_eval_preset_normalises_without_changing_size():
    image, mask = _pattern(13, 17)
    out_image, out_mask = SegmentationPresetEval(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(image, mask)
    assert out_image.dtype == torch.float32 and out_image.shape == (3, 13, 17)
    assert out_image.min() >= -1 and out_image.max() <= 1
    assert torch.equal(out_mask, mask)


def test_pad_collate_pads_masks_with_ignore():
    batch = [
        (torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.long)),
        (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.long)),
    ]
    images, masks = pad_collate(batch)
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5)
    assert int((masks[0] == 255).sum()) == 30 - 20 and images[0, :, 4:, :].abs().sum() == 0


def test_cache_decodes_each_pair_once(tmp_path):
    make_dataset(
        tmp_path, {"a": (rgb(6, 7, 30), np.full((6, 7), 2, np.uint8)), "b": (rgb(6, 7, 40), np.ones((6, 7), np.uint8))}
    )
    dataset = ImageSegmentation(tmp_path, "train", cache=True)
    uncached = ImageSegmentation(tmp_path, "train")
    first = [dataset[i] for i in range(2)]
    for path in (tmp_path / "train").rglob("*.png"):
        path.unlink()  # a second epoch must not need the files
    again = [dataset[i] for i in range(2)]
    for (image, mask), (image2, mask2) in zip(first, again):
        assert torch.equal(image, image2) and torch.equal(mask, mask2) and mask2.dtype == torch.int64
    with pytest.raises(DataError, match="file not found"):
        uncached[0]


def test_fill_cache_decodes_everything_up_front(tmp_path):
    make_dataset(tmp_path, {f"s{i}": (rgb(4, 5, i), np.zeros((4, 5), np.uint8)) for i in range(5)})
    dataset = ImageSegmentation(tmp_path, "train")
    dataset.fill_cache(threads=2)
    for path in (tmp_path / "train").rglob("*.png"):
        path.unlink()
    assert [int(dataset[i][0][0, 0, 0]) for i in range(5)] == list(range(5))


def test_scan_reports_decoded_bytes(tmp_path):
    from unet_edge.data import scan_dataset

    make_dataset(tmp_path, {"a": (rgb(6, 7), np.zeros((6, 7), np.uint8)), "b": (rgb(3, 5), np.zeros((3, 5), np.uint8))})
    make_dataset(tmp_path, {"v": (rgb(2, 2), np.zeros((2, 2), np.uint8))}, split="val")
    report = scan_dataset(tmp_path)
    assert report.decoded_bytes("train") == 4 * (6 * 7 + 3 * 5)
    assert report.decoded_bytes("val") == 4 * 4


@pytest.mark.parametrize("seed", range(3))
def test_uint8_preset_then_batch_normalize_equals_per_image_normalisation(seed):
    from unet_edge.transforms import BatchNormalize

    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    samples = [_pattern(30, 40), _pattern(20, 20)]
    torch.manual_seed(seed)
    per_image = [SegmentationPresetTrain(crop_size=24, mean=mean, std=std)(*s) for s in samples]
    torch.manual_seed(seed)
    raw = [SegmentationPresetTrain(crop_size=24, mean=mean, std=std, normalize=False)(*s) for s in samples]
    assert raw[0][0].dtype == torch.uint8
    expected_images, expected_masks = pad_collate(per_image)
    images, masks = pad_collate(raw)
    assert torch.equal(masks, expected_masks) and masks.dtype == torch.int64
    normalized = BatchNormalize(mean, std, channels_last=True)(images)
    assert normalized.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(normalized, expected_images, rtol=0, atol=1e-5)
    assert BatchNormalize(mean, std)(expected_images) is expected_images  # float batches pass through
