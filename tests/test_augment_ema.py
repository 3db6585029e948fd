"""Training recipe controls: horizontal flip and scale jitter, the weight average (EMA) that validation
measures and best.pt holds, classes assumed without a dataset.json, and evaluation independent of batching."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from unet_edge.checkpoint import load_checkpoint
from unet_edge.config import DEFAULT_HFLIP, TrainConfig
from unet_edge.data import VOC_CLASSES, read_dataset_info, scan_dataset
from unet_edge.errors import DataError
from unet_edge.loaders import training_data
from unet_edge.train import ModelEma


def asymmetric_pair(size: int = 32):
    """An image and mask whose left and right halves differ, so a flip is visible."""
    from torchvision import tv_tensors

    image = torch.zeros(3, size, size, dtype=torch.uint8)
    image[:, :, : size // 4] = 200
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[:, : size // 4] = 1
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_hflip_setting_reaches_the_training_samples(tiny_data, hflip):
    config = TrainConfig(data=str(tiny_data), image_size=48, hflip=hflip, device="cpu", cache=False)
    dataset = training_data(config, torch.device("cpu")).train_loader.dataset
    raw_image, raw_mask = dataset.load(0)
    for _ in range(4):  # the crop covers the whole 48x48 image, so only the flip can change it
        image, mask = dataset[0]
        expected = raw_mask.flip(-1) if hflip else raw_mask
        assert torch.equal(mask.as_subclass(torch.Tensor).long(), expected.as_subclass(torch.Tensor).long())
        assert torch.equal(image.as_subclass(torch.Tensor), raw_image.flip(-1) if hflip else raw_image)


def with_symmetry(tiny_data: Path, folder: Path, declared: bool | None) -> Path:
    """A copy of the tiny set whose dataset.json says `"mirror_symmetric": declared` (None: says nothing)."""
    root = folder / "data"
    shutil.copytree(tiny_data, root)
    meta = json.loads((root / "dataset.json").read_text())
    meta.pop("mirror_symmetric", None)
    if declared is not None:
        meta["mirror_symmetric"] = declared
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def flip_probability(data) -> float:
    """The probability of the horizontal flip in the training loader's transform (0 when it has none)."""
    steps = data.train_loader.dataset.transforms.transforms.transforms
    return next((step.p for step in steps if isinstance(step, v2.RandomHorizontalFlip)), 0.0)


@pytest.mark.parametrize(
    ("declared", "given", "expected"),
    [(True, None, DEFAULT_HFLIP), (False, None, 0.0), (None, None, 0.0), (True, 0.0, 0.0), (None, 1.0, 1.0)],
)
def test_the_flip_defaults_to_the_datasets_declared_mirror_symmetry(tiny_data, tmp_path, declared, given, expected):
    """No --hflip: a flip only where dataset.json says the classes look the same mirrored; a given one always wins."""
    root = with_symmetry(tiny_data, tmp_path, declared)
    data = training_data(TrainConfig(data=str(root), hflip=given, device="cpu", cache=False), torch.device("cpu"))
    assert data.hflip == expected and flip_probability(data) == expected


def test_the_embedded_set_declares_its_classes_mirror_symmetric_and_a_bad_declaration_is_one_line(tiny_data, tmp_path):
    assert read_dataset_info(tiny_data).mirror_symmetric is True
    root = with_symmetry(tiny_data, tmp_path, None)
    (root / "dataset.json").write_text(json.dumps({"classes": ["a", "b"], "mirror_symmetric": "yes"}))
    with pytest.raises(DataError, match=r'"mirror_symmetric" must be true or false, got "yes"') as caught:
        read_dataset_info(root)
    assert "\n" not in str(caught.value)


def test_scale_jitter_resizes_before_the_crop_and_keeps_mask_values():
    from unet_edge.transforms import SegmentationPresetTrain

    preset = SegmentationPresetTrain(crop_size=32, hflip_prob=0.0, scale_range=(0.5, 0.5), normalize=False)
    image, mask = preset(*asymmetric_pair(32))
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
    # Halved to 16x16 (the 8-wide band of class 1 becomes 4 wide), then padded to the crop with the ignore index.
    counts = dict(zip(*(v.tolist() for v in mask.unique(return_counts=True))))
    assert counts == {0: 16 * 12, 1: 16 * 4, 255: 32 * 32 - 16 * 16}


def test_scale_jitter_and_hflip_are_checked():
    with pytest.raises(ValueError, match="hflip"):
        TrainConfig(hflip=1.5)
    with pytest.raises(ValueError, match="scale jitter"):
        TrainConfig(scale_min=2.0, scale_max=1.0)


def test_cli_rejects_a_malformed_scale_jitter(tmp_path, cli):
    result = cli("train", "--scale-jitter", "half", "--out", str(tmp_path))
    assert result.returncode != 0 and "expected MIN,MAX" in result.stdout + result.stderr


def test_model_ema_follows_the_warmed_up_decay():
    model = torch.nn.Linear(2, 1)
    ema = ModelEma(model, decay=0.9)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # first update: decay min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.module.weight, 0.1 * start + 0.9 * model.weight)
    ema.update()  # second: min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, d * (0.1 * start + 0.9 * model.weight) + (1 - d) * model.weight)
    assert not ema.module.weight.requires_grad and not ema.module.training


@pytest.mark.slow
def test_ema_weights_are_validated_saved_and_resumed(tiny_data, tmp_path, trainer, cli, interrupted_run):
    result = trainer(tiny_data, tmp_path, name="ema", epochs=2, ema_decay=0.9)
    best = load_checkpoint(result.run_dir / "best.pt")
    # best.pt's "model" is the average (what was validated), not the optimiser's last weights.
    assert "online_model" in best and best["ema_updates"] > 0
    assert any(
        not torch.equal(best["model"][k], best["online_model"][k])
        for k in best["model"]
        if best["model"][k].is_floating_point()
    )
    report = tmp_path / "eval.json"
    evaluated = cli(
        "eval", str(result.run_dir / "best.pt"), "--device", "cpu", "--batch-size", "5", "--json", str(report)
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(report.read_text())["miou"] == pytest.approx(result.best_miou, abs=1e-9)

    run = interrupted_run(tiny_data, tmp_path / "resumed", epochs=3, stop_in_epoch=3, ema_decay=0.9)
    saved = load_checkpoint(run / "last.pt")
    assert saved["epoch"] == 2 and saved["ema_updates"] == 2 * 3  # 24 images, batches of 8
    resumed = trainer(tiny_data, tmp_path / "resumed", name="run", epochs=3, resume=str(run / "last.pt"))
    assert load_checkpoint(resumed.run_dir / "last.pt")["ema_updates"] == 3 * 3  # the average went on, not restarted


def voc_copy(source: Path, root: Path) -> Path:
    """The tiny set (labels 0..3) rewritten in the Pascal VOC layout under `root`, without dataset.json."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in ("train", "val"):
        ids = []
        for image_path in sorted((source / split / "images").iterdir()):
            Image.open(image_path).convert("RGB").save(root / "JPEGImages" / f"{image_path.stem}.jpg", quality=95)
            shutil.copy(source / split / "labels" / image_path.name, root / "SegmentationClass" / image_path.name)
            ids.append(image_path.stem)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_layout_without_dataset_json_gets_the_classes_of_its_labels(tiny_data, tmp_path):
    scan = scan_dataset(voc_copy(tiny_data, tmp_path / "my_scenes"))
    assert scan.info.classes == ("class_0", "class_1", "class_2", "class_3") and scan.info.ignore_index == 255
    assert "no dataset.json" in scan.classes_note and "dataset.json" in scan.classes_note.split("write")[1]


def test_pascal_voc_itself_keeps_the_21_voc_classes(tiny_data, tmp_path):
    scan = scan_dataset(voc_copy(tiny_data, tmp_path / "VOCdevkit" / "VOC2012"))
    assert scan.info.classes == VOC_CLASSES and "Pascal VOC" in scan.classes_note


def test_a_dataset_json_is_used_without_a_note(tiny_data):
    scan = scan_dataset(tiny_data)
    assert scan.info.num_classes == 4 and scan.classes_note is None


@pytest.mark.slow
def test_cli_says_which_classes_it_assumed(tiny_data, tmp_path, cli):
    root = voc_copy(tiny_data, tmp_path / "scenes")
    result = cli(
        "train",
        "--data",
        str(root),
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--base-channels",
        "4",
        "--depth",
        "2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "runs"),
    )
    assert result.returncode == 0, result.stderr
    notes = [line for line in (result.stdout + result.stderr).splitlines() if "no dataset.json" in line]
    assert len(notes) == 1 and "4 classes" in notes[0]
    assert load_checkpoint(tmp_path / "runs" / "unet" / "best.pt")["config"]["num_classes"] == 4


def mixed_size_set(tiny_data: Path, root: Path, ignore_index) -> Path:
    """The tiny set with val images cropped to three different sizes, and the given ignore index."""
    shutil.copytree(tiny_data, root)
    for index, image_path in enumerate(sorted((root / "val" / "images").iterdir())):
        side = (48, 40, 33)[index % 3]
        label_path = root / "val" / "labels" / image_path.name
        Image.open(image_path).crop((0, 0, side, 48 - index)).save(image_path)
        Image.open(label_path).crop((0, 0, side, 48 - index)).save(label_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["ignore_index"] = ignore_index
    if ignore_index is None:  # without an ignore index, the 255 border band becomes background
        for label_path in [*(root / "train" / "labels").iterdir(), *(root / "val" / "labels").iterdir()]:
            label = np.asarray(Image.open(label_path))
            Image.fromarray(np.where(label == 255, 0, label).astype(np.uint8)).save(label_path)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("ignore_index", [255, None])
def test_eval_is_the_same_at_any_batch_size_on_mixed_sizes(tiny_data, tmp_path, trainer, cli, ignore_index):
    root = mixed_size_set(tiny_data, tmp_path / "mixed", ignore_index)
    result = trainer(root, tmp_path, name="mixed", epochs=1)
    assert load_checkpoint(result.run_dir / "best.pt")["ignore_index"] == ignore_index
    figures = []
    for batch_size in ("1", "4", "16"):
        report = tmp_path / f"eval{batch_size}.json"
        evaluated = cli(
            "eval",
            str(result.run_dir / "best.pt"),
            "--device",
            "cpu",
            "--batch-size",
            batch_size,
            "--json",
            str(report),
        )
        assert evaluated.returncode == 0, evaluated.stderr
        figures.append(json.loads(report.read_text())["miou"])
    assert figures[0] == pytest.approx(figures[1], abs=1e-9) == pytest.approx(figures[2], abs=1e-9)
    assert figures[0] == pytest.approx(result.best_miou, abs=1e-9)


def reference_dice_ce(logits: torch.Tensor, masks: torch.Tensor, ignore: int) -> torch.Tensor:
    """Dice + cross-entropy written out per class with loops, to check the vectorised loss against."""
    valid = masks != ignore
    ce = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], masks[valid])
    probs = logits.softmax(1)
    losses = []
    for c in range(logits.shape[1]):
        truth = (masks == c) & valid
        if truth.any():
            p = probs[:, c][valid]
            t = truth[valid].float()
            losses.append(1 - 2 * (p * t).sum() / (p.sum() + t.sum()))
    return ce + torch.stack(losses).mean()


def test_dice_ce_loss_matches_its_definition_and_ignores_what_it_should():
    from unet_edge.train import segmentation_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 9, 7)
    masks = torch.randint(0, 4, (3, 9, 7))  # class 4 never occurs: it must not count
    masks[0, :3] = 255
    loss = segmentation_loss(255, "dice-ce")
    torch.testing.assert_close(loss(logits, masks), reference_dice_ce(logits, masks, 255))
    # Logits under ignored pixels change nothing, and a batch with nothing to count gives 0, not NaN.
    moved = logits.clone()
    moved[0, :, :3] += 10 * torch.randn_like(moved[0, :, :3])
    torch.testing.assert_close(loss(moved, masks), loss(logits, masks))
    assert loss(logits, torch.full_like(masks, 255)).item() == 0.0
    # A confident, correct prediction has (near) zero loss; the Dice term adds to plain cross-entropy.
    perfect = 50 * torch.nn.functional.one_hot(masks.clamp(max=4), 5).permute(0, 3, 1, 2).float()
    assert loss(perfect, masks).item() < 1e-6
    assert loss(logits, masks) > segmentation_loss(255, "ce")(logits, masks)
    # Without an ignore index, crop padding holds -100 and is skipped the same way.
    padded = masks.masked_fill(masks == 255, -100)
    torch.testing.assert_close(
        segmentation_loss(None, "dice-ce")(logits, padded), reference_dice_ce(logits, padded, -100)
    )


def test_loss_is_a_checked_setting_and_old_checkpoints_trained_with_cross_entropy():
    with pytest.raises(ValueError, match="loss must be one of ce, dice-ce"):
        TrainConfig(loss="focal")
    assert TrainConfig.from_dict({"epochs": 3}).loss == "ce"
    assert TrainConfig.from_dict(TrainConfig(loss="dice-ce").to_dict()).loss == "dice-ce"


@pytest.mark.parametrize("loss", ["ce", "dice-ce"])
def test_the_loss_setting_is_what_training_optimises(tiny_data, loss):
    from unet_edge.train import Training, segmentation_loss

    config = TrainConfig(data=str(tiny_data), image_size=32, device="cpu", cache=False, loss=loss)
    data = training_data(config, torch.device("cpu"))
    training = Training.build(config, data, torch.device("cpu"), None, planned_epochs=1)
    images, masks = next(iter(data.train_loader))
    logits = training.model(data.normalize(images))
    expected = {kind: segmentation_loss(data.ignore_index, kind)(logits, masks) for kind in ("ce", "dice-ce")}
    assert training.criterion(logits, masks) == expected[loss] and expected["ce"] != expected["dice-ce"]
