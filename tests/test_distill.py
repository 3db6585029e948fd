"""Distillation: the terms' values, the frozen teacher, the teacher checks, and what a distilled run records."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from unet_edge.checkpoint import load_checkpoint, load_model, save_checkpoint
from unet_edge.config import ModelConfig, TrainConfig
from unet_edge.data import pad_collate
from unet_edge.distill import (
    ChannelWiseDivergence,
    CorrelationDistillation,
    Distillation,
    FrozenTeacher,
    PixelKLDivergence,
    SoftLabels,
    Teacher,
    TeacherEnsemble,
    check_same_teacher,
    distill_term,
    ensemble_digest,
    load_teacher,
    load_teachers,
)
from unet_edge.errors import CheckpointError, TrainingError
from unet_edge.io import read_jsonl, sha256_file
from unet_edge.loaders import pad_index, training_data
from unet_edge.model import build_model
from unet_edge.train import TrainHooks, Training, fit, train_one_epoch

STUDENT_OPTIONS = (
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--image-size",
    "32",
    "--base-channels",
    "4",
    "--depth",
    "2",
    "--device",
    "cpu",
)


@pytest.fixture(scope="module")
def teacher_checkpoint(tiny_data, tmp_path_factory) -> Path:
    """A teacher of another shape than the tiny students: wider, deeper, conv-bn-relu, bilinear up-sampling."""
    model = ModelConfig(base_channels=6, depth=3, upsample="bilinear", block_order="conv-bn-relu")
    config = TrainConfig(
        data=str(tiny_data),
        epochs=1,
        batch_size=8,
        image_size=32,
        model=model,
        device="cpu",
        out=str(tmp_path_factory.mktemp("teacher")),
        name="t",
    )
    return fit(config).run_dir / "best.pt"


def kl(p: list[float], q: list[float]) -> float:
    """KL(p ‖ q) of two discrete distributions, from the definition."""
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


class FixedLogits(nn.Module):
    """A stand-in teacher that answers every batch with the same logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


def fixed_teacher(logits: torch.Tensor) -> Teacher:
    return Teacher(FrozenTeacher(FixedLogits(logits)), Path("fixed"), "0" * 64, "checkpoint", "fixed logits")


@pytest.mark.parametrize("ignore_index", [255, None])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_pixel_kl_by_hand_skips_ignored_and_padded_pixels(ignore_index, temperature):
    # A 1x3 sample and a 1x2 one padded to 1x3 by the batch collation; two classes.
    pad = pad_index(ignore_index)
    first = (
        [0, 255, 1] if ignore_index is not None else [0, 0, 1]
    )  # pixel 1 is ignored only when the set has an ignore index
    batch = [
        (torch.zeros(3, 1, 3, dtype=torch.uint8), torch.tensor([first])),
        (torch.zeros(3, 1, 2, dtype=torch.uint8), torch.tensor([[1, 0]])),
    ]
    images, masks = pad_collate(batch, ignore_index=pad)
    assert masks[1, 0, 2] == pad
    big = [20.0, -20.0]  # teacher logits where the pixel does not count: a large KL if it were counted
    # N x K x W, then H = 1: pixel (sample 0, x 0) and (1, 0) are informative, (0, 2) and (1, 1) agree with the student
    teacher = torch.tensor(
        [[[math.log(3), big[0], 0.0], [0.0, big[1], 0.0]], [[0.0, 0.0, big[0]], [math.log(3), 0.0, big[1]]]]
    ).unsqueeze(2)
    student = torch.zeros(2, 2, 1, 3, requires_grad=True)
    distillation = Distillation(fixed_teacher(teacher), PixelKLDivergence(temperature), weight=1.0, pad_value=pad)
    value = distillation(images.float(), student, masks)

    t = temperature
    uniform = [0.5, 0.5]
    informative = kl(softmax([math.log(3) / t, 0.0]), uniform)  # pixels (0, 0) and (1, 0)
    ignored = kl(softmax([big[0] / t, big[1] / t]), uniform)
    if ignore_index is not None:
        expected = t * t * (2 * informative) / 4  # 4 pixels count: (0,0), (0,2), (1,0), (1,1)
    else:
        expected = t * t * (2 * informative + ignored) / 5  # (0,1) is a class-0 pixel here and counts
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert student.grad[1, :, 0, 2].abs().sum() == 0  # the padded pixel gets no gradient
    assert student.grad[0, :, 0, 0].abs().sum() > 0
    if ignore_index is not None:
        assert student.grad[0, :, 0, 1].abs().sum() == 0


def test_channel_wise_divergence_by_hand_over_the_valid_pixels_of_each_map():
    # Image 0: two class maps over 3 pixels, the last one ignored; image 1: every pixel ignored (its maps do not count).
    teacher = torch.tensor([[[[math.log(3), 0.0, 50.0]], [[0.0, 0.0, -50.0]]], [[[5.0, -3.0, 1.0]], [[2.0, 7.0, 0.0]]]])
    student = torch.zeros(2, 2, 1, 3)
    valid = torch.tensor([[[True, True, False]], [[False, False, False]]])
    for t in (1.0, 3.0):
        expected = t * t * (kl(softmax([math.log(3) / t, 0.0]), [0.5, 0.5]) + 0.0) / 2
        assert ChannelWiseDivergence(t)(student, teacher, valid).item() == pytest.approx(expected, rel=1e-5)
    # with every pixel counted, mmrazor's formula: sum over maps of the spatial KL, divided by N x C
    everything = torch.ones(2, 1, 3, dtype=torch.bool)
    maps = [softmax([v for v in teacher[n, c, 0].tolist()]) for n in range(2) for c in range(2)]
    expected = sum(kl(q, [1 / 3] * 3) for q in maps) / 4
    assert ChannelWiseDivergence(1.0)(student, teacher, everything).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_the_teacher_gets_no_gradients_and_stays_in_eval_mode(tiny_data, teacher_checkpoint):
    cpu = torch.device("cpu")
    config = TrainConfig(
        data=str(tiny_data),
        batch_size=8,
        image_size=32,
        model=ModelConfig(base_channels=4, depth=2),
        device="cpu",
        teacher=str(teacher_checkpoint),
    )
    data = training_data(config, cpu)
    teacher = load_teacher(teacher_checkpoint, data.classes, data.mean, data.std, cpu)
    before = {name: value.clone() for name, value in teacher.model.state_dict().items()}
    distillation = Distillation(teacher, ChannelWiseDivergence(4.0), 0.1, pad_index(data.ignore_index))
    training = Training.build(config, data, cpu, None, 1, distillation)
    teacher.model.train()  # as any `model.train()` of a training loop would
    assert not any(module.training for module in teacher.model.modules())
    loss, seen, _ = train_one_epoch(
        training.train_model,
        data.train_loader,
        training.optimizer,
        training.scheduler,
        training.criterion,
        cpu,
        normalize=data.normalize,
        auxiliary=training.auxiliary,
    )
    assert seen > 0 and math.isfinite(loss)
    assert not any(module.training for module in teacher.model.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    after = teacher.model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())  # BatchNorm statistics included
    teacher_seconds, mean_term = distillation.take_epoch_stats()
    assert teacher_seconds > 0 and mean_term > 0
    assert all(p.grad is not None for p in training.model.parameters())


def _bad_teacher(kind: str, teacher_checkpoint: Path, folder: Path) -> Path:
    from unet_edge.artifact import artifact_metadata
    from unet_edge.formats.torchscript import export_torchscript

    state = load_checkpoint(teacher_checkpoint)
    path = folder / f"{kind}.pt"
    if kind == "classes":
        state["classes"] = [*state["classes"][:-1], "star"]
    elif kind == "mean":
        state["mean"] = [0.5, 0.5, 0.5]
    elif kind == "input-channels":
        model = build_model(ModelConfig(num_classes=len(state["classes"]), in_channels=1, base_channels=4, depth=2))
        state.update(model=model.state_dict(), config=model.config.to_dict())
    elif kind == "output-channels":
        loaded = load_model(teacher_checkpoint)
        path = folder / "three-maps.ts"  # metadata of 4 classes on a model that gives 3 maps
        export_torchscript(
            build_model(ModelConfig(num_classes=3, base_channels=4, depth=2)).eval(),
            path,
            artifact_metadata(loaded, "fp32"),
        )
        return path
    elif kind == "no-metadata":
        path = folder / "bare.ts"
        torch.jit.save(torch.jit.script(load_model(teacher_checkpoint).model), str(path))
        return path
    save_checkpoint(path, state)
    return path


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("classes", "the teacher predicts classes"),
        ("mean", "the teacher normalises with mean [0.5, 0.5, 0.5]"),
        ("input-channels", "does not take a 3-channel image batch"),
        ("output-channels", "a teacher must give logits of shape (1, 4, 32, 32)"),
        ("no-metadata", "no class names"),
    ],
)
@pytest.mark.slow
def test_a_mismatched_teacher_is_a_one_line_error_before_training(
    kind, fragment, tiny_data, teacher_checkpoint, tmp_path, cli, one_line_error
):
    bad = _bad_teacher(kind, teacher_checkpoint, tmp_path)
    result = cli(
        "train", "--data", str(tiny_data), *STUDENT_OPTIONS, "--out", str(tmp_path / "runs"), "--teacher", str(bad)
    )
    one_line_error(result, str(bad), fragment)
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


@pytest.mark.slow
def test_distilled_run_records_its_teacher_and_exports_as_a_plain_student(tiny_data, teacher_checkpoint, tmp_path, cli):
    result = cli(
        "train",
        "--data",
        str(tiny_data),
        *STUDENT_OPTIONS,
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "d",
        "--teacher",
        str(teacher_checkpoint),
        "--distill-loss",
        "kl",
        "--distill-weight",
        "2",
        "--distill-temperature",
        "3",
        "--distill-pixels",
        "all",
    )
    assert result.returncode == 0, result.stderr
    assert re.search(
        rf"teacher {re.escape(str(teacher_checkpoint))} "
        r"\(UNetStudent base 6, depth 3, conv-bn-relu, bilinear\): val mIoU 0\.\d{4}",
        result.stderr,
    )
    assert len(re.findall(r"teacher \d+% of step time", result.stderr)) == 2
    run = tmp_path / "runs" / "d"
    records = read_jsonl(run / "metrics.jsonl")
    # The teacher's logits were computed once, before the first epoch: no teacher time in the steps after.
    assert "logits computed once per training image" in result.stderr
    assert "taught where it labels the pixel right" not in result.stderr  # --distill-pixels all
    assert records[0]["soft_labels_s"] > 0 and all("soft_labels_s" not in r for r in records[1:])
    assert all(r["teacher_time_s"] == 0 and r["teacher_share"] == 0 for r in records)
    assert all(r["distill_loss"] > 0 for r in records)
    state = load_checkpoint(run / "best.pt")
    recorded = state["teacher"]
    assert recorded["path"] == str(teacher_checkpoint) and recorded["sha256"] == sha256_file(teacher_checkpoint)
    assert 0 <= recorded["val_miou"] <= 1 and recorded["kind"] == "checkpoint"
    settings = state["train_config"]
    assert (
        settings["teacher"],
        settings["distill_loss"],
        settings["distill_weight"],
        settings["distill_temperature"],
        settings["distill_pixels"],
    ) == (str(teacher_checkpoint), "kl", 2.0, 3.0, "all")

    report = tmp_path / "eval.json"
    evaluated = cli("eval", str(run / "best.pt"), "--data", str(tiny_data), "--json", str(report), "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(report.read_text())["miou"] == pytest.approx(state["metrics"]["miou"], abs=1e-9)
    # The distilled student exports like any checkpoint, and its TorchScript file can teach in turn.
    exported = cli(
        "export", str(run / "best.pt"), "--format", "torchscript", "--out", str(tmp_path / "exported"), "--name", "d"
    )
    assert exported.returncode == 0, exported.stderr
    script = tmp_path / "exported" / "d" / "model.ts"
    again = cli(
        "train",
        "--data",
        str(tiny_data),
        *STUDENT_OPTIONS,
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "s",
        "--teacher",
        str(script),
        "--no-distill-cache",
    )
    assert again.returncode == 0, again.stderr
    assert "run on every batch" in again.stderr
    online = read_jsonl(tmp_path / "runs" / "s" / "metrics.jsonl")
    assert all(0 < r["teacher_share"] < 1 and r["teacher_time_s"] > 0 for r in online)
    assert load_checkpoint(tmp_path / "runs" / "s" / "last.pt")["teacher"]["kind"] == "torchscript"


@pytest.mark.slow
def test_resume_keeps_the_teacher_and_refuses_another_file(
    tiny_data, teacher_checkpoint, tiny_run, tmp_path, interrupted_run, cli, one_line_error
):
    run = interrupted_run(tiny_data, tmp_path, epochs=3, stop_in_epoch=3, teacher=str(teacher_checkpoint))
    last = run / "last.pt"
    before = last.read_bytes()
    recorded = load_checkpoint(last)["teacher"]
    other = tiny_run.run_dir / "best.pt"
    refused = cli("train", "--resume", str(last), "--teacher", str(other), "--device", "cpu")
    one_line_error(refused, str(other), "not the teacher", "a resumed run keeps its teacher")
    assert last.read_bytes() == before
    plain = cli(
        "train", "--resume", str(tiny_run.run_dir / "last.pt"), "--teacher", str(teacher_checkpoint), "--device", "cpu"
    )
    one_line_error(plain, "this run trained without a teacher")
    moved = tmp_path / "moved" / "teacher.pt"  # the same file in a new place is the same teacher
    moved.parent.mkdir()
    shutil.move(teacher_checkpoint, moved)
    try:
        missing = cli("train", "--resume", str(last), "--device", "cpu")
        one_line_error(missing, str(teacher_checkpoint), "teacher not found", "--teacher")
        resumed = cli("train", "--resume", str(last), "--teacher", str(moved), "--device", "cpu")
    finally:
        shutil.move(moved, teacher_checkpoint)
    assert resumed.returncode == 0, resumed.stderr
    state = load_checkpoint(last)
    assert state["epoch"] == 3
    assert state["teacher"]["sha256"] == recorded["sha256"] and state["teacher"]["val_miou"] == recorded["val_miou"]
    assert state["train_config"]["distill_pixels"] == "teacher-right"  # the default, kept by the resumed run
    assert "taught where it labels the pixel right" in resumed.stderr


@pytest.mark.slow
def test_a_teacher_worse_than_the_student_is_a_warning(tiny_data, teacher_checkpoint, tmp_path, trainer):
    loaded = load_model(teacher_checkpoint)
    head = [m for m in loaded.model.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():  # a teacher that calls every pixel a triangle
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    weak = tmp_path / "weak.pt"
    save_checkpoint(weak, {**loaded.state, "model": loaded.model.state_dict()})

    class Notes(TrainHooks):
        def __init__(self) -> None:
            self.notes: list[str] = []

        def on_note(self, message: str) -> None:
            self.notes.append(message)

    hooks = Notes()
    result = trainer(tiny_data, tmp_path, name="w", epochs=2, hooks=hooks, teacher=str(weak))
    teacher_miou = load_checkpoint(result.run_dir / "last.pt")["teacher"]["val_miou"]
    (described,) = [note for note in hooks.notes if note.startswith("teacher ")]
    assert described.startswith(f"teacher {weak} ({load_teacher_description(weak)}): val mIoU {teacher_miou:.4f};")
    warnings = [note for note in hooks.notes if note.startswith("warning:")]
    passed = [r["epoch"] for r in result.history if r["miou"] > teacher_miou]
    assert passed, "the student never passed the weak teacher: the warning went untested"
    assert len(warnings) == 1 and f"passed the teacher's {teacher_miou:.4f} at epoch {passed[0]}" in warnings[0]


def test_an_ensemble_teaches_the_mean_of_its_members_probabilities():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5) * 3
    logits = TeacherEnsemble([FixedLogits(a), FixedLogits(b)])(torch.zeros(2, 3, 4, 5))
    mean = (a.softmax(1) + b.softmax(1)) / 2
    assert torch.allclose(logits.softmax(1), mean, atol=1e-6)
    assert torch.allclose(logits.exp().sum(1), torch.ones(2, 4, 5), atol=1e-5)  # log-probabilities
    by_hand = [sum(softmax(m[0, :, 1, 2].tolist())[k] for m in (a, b)) / 2 for k in range(3)]
    assert logits[0, :, 1, 2].exp().tolist() == pytest.approx(by_hand, rel=1e-5)
    # An ensemble of one model's copies is that model over the classes: the class-distribution terms are zero for a
    # student that matches it; cwd, which reads each class map over the pixels, sees its log-probabilities.
    same = TeacherEnsemble([FixedLogits(a), FixedLogits(a)])(torch.zeros(2, 3, 4, 5))
    valid = torch.ones(2, 4, 5, dtype=torch.bool)
    for kind in ("kl", "dist"):
        assert distill_term(kind, 1.0)(a, same, valid).item() == pytest.approx(0.0, abs=1e-5)
    assert distill_term("cwd", 1.0)(a.log_softmax(1), same, valid).item() == pytest.approx(0.0, abs=1e-5)
    assert distill_term("cwd", 1.0)(a, same, valid).item() > 1e-3


def _other_teacher(teacher_checkpoint: Path, path: Path) -> Path:
    """A teacher file like `teacher_checkpoint` with other weights (the first convolution's scaled)."""
    state = load_checkpoint(teacher_checkpoint)
    first = next(name for name, value in state["model"].items() if value.ndim == 4)
    state["model"] = {**state["model"], first: state["model"][first] * 1.5}
    save_checkpoint(path, state)
    return path


@pytest.mark.slow
def test_several_teachers_load_as_their_ensemble_and_a_resume_keeps_the_same_files(
    tiny_data, teacher_checkpoint, tmp_path
):
    cpu = torch.device("cpu")
    data = training_data(TrainConfig(data=str(tiny_data), batch_size=8, image_size=32, device="cpu"), cpu)
    other = _other_teacher(teacher_checkpoint, tmp_path / "other.pt")
    files = [teacher_checkpoint, other]
    teacher = load_teachers(files, data.classes, data.mean, data.std, cpu)
    single = [load_teacher(path, data.classes, data.mean, data.std, cpu) for path in files]
    images = torch.randn(2, 3, 32, 32)
    expected = (single[0].model(images).softmax(1) + single[1].model(images).softmax(1)) / 2
    assert torch.allclose(teacher.model(images).softmax(1), expected, atol=1e-6)
    assert teacher.kind == "ensemble" and teacher.description.startswith("ensemble of 2: 2 x UNetStudent base 6")
    record = teacher.record(0.5)
    assert record["path"] == [str(p) for p in files] and record["val_miou"] == 0.5
    assert record["sha256"] == ensemble_digest([sha256_file(p) for p in files])
    assert [m["sha256"] for m in record["members"]] == [sha256_file(p) for p in files]
    assert load_teachers([teacher_checkpoint], data.classes, data.mean, data.std, cpu).kind == "checkpoint"
    with pytest.raises(CheckpointError, match="given twice as a teacher"):
        load_teachers([teacher_checkpoint, other, teacher_checkpoint], data.classes, data.mean, data.std, cpu)
    # A resumed run must name the same files in the same order (the ensemble's digest), wherever they now are.
    check_same_teacher(record, files, "last.pt")
    with pytest.raises(TrainingError, match=re.escape("not the teacher last.pt was trained with")):
        check_same_teacher(record, files[::-1], "last.pt")
    with pytest.raises(TrainingError, match="not the teacher"):
        check_same_teacher(record, files[:1], "last.pt")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path / 'gone.pt'))}: teacher not found"):
        check_same_teacher(record, [teacher_checkpoint, tmp_path / "gone.pt"], "last.pt")
    # A member that does not fit is refused by name, as a single teacher is.
    bad = _bad_teacher("classes", teacher_checkpoint, tmp_path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(bad))}: the teacher predicts classes"):
        load_teachers([teacher_checkpoint, bad], data.classes, data.mean, data.std, cpu)


@pytest.mark.slow
def test_train_distils_from_every_teacher_given(tiny_data, teacher_checkpoint, tmp_path, cli):
    other = _other_teacher(teacher_checkpoint, tmp_path / "other.pt")
    result = cli(
        "train",
        "--data",
        str(tiny_data),
        *STUDENT_OPTIONS,
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "e",
        "--teacher",
        str(teacher_checkpoint),
        "--teacher",
        str(other),
    )
    assert result.returncode == 0, result.stderr
    assert f"teacher {teacher_checkpoint}, {other} (ensemble of 2: 2 x UNetStudent base 6, depth 3" in result.stderr
    state = load_checkpoint(tmp_path / "runs" / "e" / "last.pt")
    assert state["train_config"]["teacher"] == (str(teacher_checkpoint), str(other))
    assert state["teacher"]["kind"] == "ensemble" and state["teacher"]["path"] == [str(teacher_checkpoint), str(other)]
    assert TrainConfig.from_dict(state["train_config"]).teacher == (str(teacher_checkpoint), str(other))


def load_teacher_description(path: Path) -> str:
    config = load_model(path).config
    return f"UNetStudent base {config.base_channels}, depth {config.depth}, {config.block_order}, {config.upsample}"


def test_distillation_settings_are_checked(tiny_data, cli):
    with pytest.raises(ValueError, match="distill temperature must be > 0"):
        TrainConfig(distill_temperature=0)
    with pytest.raises(ValueError, match="distill loss must be one of kl, cwd"):
        TrainConfig(distill_loss="mse")
    result = cli("train", "--data", str(tiny_data), "--distill-weight", "2")
    assert result.returncode == 2 and "only apply with --teacher" in result.stderr


@pytest.mark.parametrize("kind", ["kl", "cwd", "dist"])
def test_every_term_is_zero_for_the_teacher_ignores_masked_pixels_and_trains_the_student_only(kind):
    torch.manual_seed(0)
    teacher = torch.randn(2, 4, 5, 6, requires_grad=True)
    valid = torch.rand(2, 5, 6) > 0.3
    term = distill_term(kind, 2.0)
    assert term(teacher.detach().clone(), teacher, valid).item() == pytest.approx(0.0, abs=1e-5)
    student = torch.randn(2, 4, 5, 6, requires_grad=True)
    value = term(student, teacher, valid)
    assert value.item() > 1e-3
    # What the pixels that do not count hold, in either model, changes nothing.
    noisy_student = torch.where(valid.unsqueeze(1), student.detach(), torch.randn(2, 4, 5, 6) * 9)
    noisy_teacher = torch.where(valid.unsqueeze(1), teacher.detach(), torch.randn(2, 4, 5, 6) * 9)
    assert term(noisy_student, noisy_teacher, valid).item() == pytest.approx(value.item(), rel=1e-5)
    value.backward()
    assert teacher.grad is None  # the gradient reaches the student only
    assert student.grad[valid.unsqueeze(1).expand_as(student)].abs().sum() > 0
    assert student.grad[~valid.unsqueeze(1).expand_as(student)].abs().sum() == 0
    assert isinstance(distill_term("dist", 1.0), CorrelationDistillation)


@pytest.mark.parametrize("ignore_index", [255, 0])
def test_teacher_right_counts_only_the_pixels_the_teacher_labels_right(ignore_index):
    """The term over the pixels where the teacher's arg-max is the label, and no gradient elsewhere; an ignored pixel
    never counts, even where the ignore index is a class id the teacher picks."""
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 4, 5)
    masks = torch.randint(0, 3, (2, 4, 5))
    teacher[0, 1, 0, :2] = teacher[1, 2, 1, :2] = 10.0
    masks[0, 0, :2] = masks[1, 1, :2] = 1  # the teacher is right on two pixels for certain, wrong on two others
    teacher[0, 0, 3, 4] = 10.0
    masks[0, 3, 4] = ignore_index  # ignored, though with ignore index 0 the teacher picks that class there
    right = (teacher.argmax(1) == masks) & (masks != ignore_index)
    assert right[0, 0, :2].all() and not right[1, 1, :2].any() and not right[0, 3, 4]
    student = torch.randn(2, 3, 4, 5, requires_grad=True)
    distillation = Distillation(
        fixed_teacher(teacher), PixelKLDivergence(1.0), 1.0, pad_value=ignore_index, teacher_right_only=True
    )
    value = distillation(student.detach(), student, masks)
    assert value.item() == pytest.approx(PixelKLDivergence(1.0)(student, teacher, right).item(), rel=1e-6)
    assert value.item() != pytest.approx(PixelKLDivergence(1.0)(student, teacher, masks != ignore_index).item())
    value.backward()
    wrong = (~right).unsqueeze(1).expand_as(student)
    assert student.grad[wrong].abs().sum() == 0 and student.grad[~wrong].abs().sum() > 0
    with pytest.raises(ValueError, match="distill pixels must be one of all, teacher-right"):
        TrainConfig(distill_pixels="right")
    # The default; a checkpoint saved before the setting existed distilled on every valid pixel, and resumes so.
    assert TrainConfig().distill_pixels == "teacher-right"
    assert TrainConfig.from_dict({"epochs": 3, "teacher": "t.pt"}).distill_pixels == "all"
    assert TrainConfig.from_dict(TrainConfig().to_dict()).distill_pixels == "teacher-right"


def test_the_term_ramps_in_linearly_over_its_warm_up_and_restarts_where_a_resumed_epoch_stands():
    teacher = torch.randn(1, 2, 3, 3)
    student = torch.zeros(1, 2, 3, 3)
    masks = torch.zeros(1, 3, 3, dtype=torch.int64)
    distillation = Distillation(fixed_teacher(teacher), PixelKLDivergence(1.0), 2.0, pad_value=255, warmup_steps=4)
    full = 2.0 * PixelKLDivergence(1.0)(student, teacher, masks != 255).item()
    values = [distillation(student, student, masks).item() for _ in range(6)]
    assert values == pytest.approx([full * k / 4 for k in (1, 2, 3, 4, 4, 4)], rel=1e-6)
    distillation.begin_epoch(1, 2)  # epoch 1 of a run of 2 steps per epoch: the third step
    assert distillation(student, student, masks).item() == pytest.approx(full * 3 / 4, rel=1e-6)


def test_soft_labels_are_the_teachers_logits_of_the_crop_moved_with_the_image(tiny_data):
    """A point-wise teacher (1x1 convolution) has no border effect: the stored logits, cropped and flipped with the
    image by the training transforms, equal the teacher run on the augmented crop itself, wherever the mask counts."""
    cpu = torch.device("cpu")
    config = TrainConfig(data=str(tiny_data), batch_size=4, image_size=40, hflip=0.5, device="cpu")
    data = training_data(config, cpu)
    torch.manual_seed(0)
    teacher = FrozenTeacher(nn.Conv2d(3, len(data.classes), 1))
    soft = SoftLabels.compute(data.train_loader.dataset, teacher, data.normalize, cpu)
    assert all(t.dtype == torch.float16 for t in soft.logits)
    for index in range(len(soft)):
        image, mask, logits = soft[index]
        expected = teacher(data.normalize(image.unsqueeze(0)))[0]
        counted = (mask != pad_index(data.ignore_index)).unsqueeze(0).expand_as(expected)
        assert counted.any()
        torch.testing.assert_close(logits.float()[counted], expected[counted], atol=2e-2, rtol=1e-2)
