"""Reliability: bad input gets one line and exit 1, nothing is written; crashes lose nothing; untrusted files run no
code.

Every CLI case runs the real command (the `cli` fixture; signals and crashes in real subprocesses) and compares the
files around it before and after.
"""

import json
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unet_edge.checkpoint import load_checkpoint, load_model, save_checkpoint
from unet_edge.data import DatasetInfo, scan_dataset
from unet_edge.errors import CheckpointError, DataError, OutputError
from unet_edge.io import append_jsonl, atomic_write_text, read_jsonl
from unet_edge.model import ModelConfig, build_model
from unet_edge.synth import SynthSpec, write_synth

CLI = [sys.executable, "-m", "unet_edge_cli.main"]
TINY_TRAIN = ["--batch-size", "8", "--image-size", "32", "--base-channels", "4", "--depth", "2", "--device", "cpu"]


def snapshot(*roots: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `roots` with its bytes and mtime: equal snapshots mean nothing was written (a run's
    .lock is left out: each process that takes the lock writes its pid there)."""
    files = {}
    for root in roots:
        paths = (
            [root]
            if root.is_file()
            else sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock")
            if root.exists()
            else []
        )
        for path in paths:
            files[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
    return files


class Payload:
    """A pickle that creates `marker` when unpickled: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_checkpoint, exported_all) -> Path:
    """A folder with a checkpoint, a text file, a PNG, a plain file and an export with its manifest (a copy of
    the session's export of the same checkpoint)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    shutil.copy(tiny_checkpoint, root / "best.pt")
    (root / "notes.txt").write_text("not a model\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "picture.png")
    (root / "plain-file").write_text("a file where a folder is expected\n")
    shutil.copytree(exported_all[0], root / "exported" / "tiny")
    return root


BAD_INPUTS = {
    "train: missing --data folder": (
        ["train", "--data", "{ws}/missing", *TINY_TRAIN, "--out", "{ws}/runs"],
        ["missing: dataset folder not found"],
    ),
    "train: --data is a file": (
        ["train", "--data", "{ws}/notes.txt", *TINY_TRAIN, "--out", "{ws}/runs"],
        ["notes.txt: dataset folder not found"],
    ),
    "train: unknown --device": (
        ["train", "--data", "{data}", *TINY_TRAIN, "--device", "tpu9", "--out", "{ws}/runs"],
        ["unknown device 'tpu9'"],
    ),
    "train: --resume a text file": (
        ["train", "--resume", "{ws}/notes.txt", "--device", "cpu"],
        ["notes.txt: not a readable checkpoint"],
    ),
    "train: --out under a file": (
        ["train", "--data", "{data}", *TINY_TRAIN, "--epochs", "1", "--out", "{ws}/plain-file"],
        ["plain-file", "Not a directory"],
    ),
    "eval: a folder as checkpoint": (
        ["eval", "{ws}/exported", "--device", "cpu"],
        ["exported: is a folder, expected a checkpoint file"],
    ),
    "eval: unknown --device": (["eval", "{ws}/best.pt", "--device", "tpu9"], ["unknown device 'tpu9'"]),
    "eval: missing --data": (
        ["eval", "{ws}/best.pt", "--data", "{ws}/missing", "--device", "cpu"],
        ["missing: dataset folder not found"],
    ),
    "eval: --json is a folder": (
        ["eval", "{ws}/best.pt", "--data", "{data}", "--device", "cpu", "--json", "{ws}/exported"],
        ["exported: is a folder, expected a file path"],
    ),
    "eval: --json under a file": (
        ["eval", "{ws}/best.pt", "--data", "{data}", "--device", "cpu", "--json", "{ws}/plain-file/r.json"],
        ["r.json: cannot write here", "plain-file is not a folder"],
    ),
    "export: a text file": (
        ["export", "{ws}/notes.txt", "--out", "{ws}/new-export"],
        ["notes.txt: not a readable checkpoint"],
    ),
    "export: a PNG": (
        ["export", "{ws}/picture.png", "--out", "{ws}/new-export"],
        ["picture.png: not a readable checkpoint"],
    ),
    "export: --out under a file": (
        ["export", "{ws}/best.pt", "--out", "{ws}/plain-file", "--parity-images", "0"],
        ["plain-file", "Not a directory"],
    ),
    "verify: a text file": (
        ["verify", "{ws}/notes.txt", "--checkpoint", "{ws}/best.pt"],
        ["notes.txt: unsupported model file"],
    ),
    "verify: a PNG as model": (
        ["verify", "{ws}/picture.png", "--checkpoint", "{ws}/best.pt"],
        ["picture.png: unsupported model file"],
    ),
    "verify: a folder as model": (
        ["verify", "{ws}/exported/tiny", "--checkpoint", "{ws}/best.pt"],
        ["tiny: is a folder, expected a model file"],
    ),
    "verify: a PNG as checkpoint": (
        ["verify", "{ws}/exported/tiny/model.onnx", "--checkpoint", "{ws}/picture.png"],
        ["picture.png: unsupported model file"],
    ),
    "bench: a text file": (
        ["bench", "{ws}/notes.txt", "--providers", "cpu", "--iters", "1"],
        ["notes.txt: unsupported model file"],
    ),
    "bench: --markdown under a file": (
        [
            "bench",
            "{ws}/exported/tiny/model.onnx",
            "--providers",
            "cpu",
            "--iters",
            "1",
            "--markdown",
            "{ws}/plain-file/b.md",
        ],
        ["b.md: cannot write here"],
    ),
    "data synth: --out under a file": (
        ["data", "synth", "--out", "{ws}/plain-file/data", "--num-train", "2", "--num-val", "1"],
        ["plain-file", "Not a directory"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, workspace, tiny_data, cli, one_line_error):
    args, fragments = BAD_INPUTS[case]
    before = snapshot(workspace, tiny_data)
    result = cli(*(a.format(ws=workspace, data=tiny_data) for a in args), cwd=workspace)
    one_line_error(result, *fragments)
    assert snapshot(workspace, tiny_data) == before


@pytest.mark.slow
def test_debug_shows_the_traceback(workspace, cli):
    result = cli("--debug", "eval", str(workspace / "notes.txt"))
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


# --- untrusted files -------------------------------------------------------------------------


@pytest.fixture
def malicious(tmp_path) -> tuple[Path, Path]:
    """A torch.save file whose unpickling would create `marker` (checked to really do so when loaded unsafely)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "malicious.pt"
    torch.save({"model": Payload(marker), "config": {}, "classes": [], "mean": [], "std": []}, path)
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_malicious_checkpoint_runs_no_code_in_load_checkpoint(malicious, tmp_path):
    path, marker = malicious
    with pytest.raises(
        CheckpointError, match=r"malicious\.pt: refused to load: the file asks to run or build io\.open"
    ):
        load_checkpoint(path)
    raw = tmp_path / "raw.pt"  # a bare pickle (the pre-zip torch format) with the same payload
    raw.write_bytes(pickle.dumps({"model": Payload(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"raw\.pt: refused to load"):
        load_checkpoint(raw)
    assert not marker.exists()


@pytest.mark.parametrize("command", [["eval"], ["export", "--out", "{out}"], ["train", "--device", "cpu", "--resume"]])
def test_malicious_checkpoint_runs_no_code_in_the_cli(command, malicious, tmp_path, cli, one_line_error):
    path, marker = malicious
    out = tmp_path / "exported"
    result = cli(*(a.format(out=out) for a in command), str(path), cwd=tmp_path)
    one_line_error(result, "malicious.pt: refused to load")
    assert not marker.exists() and not out.exists()


@pytest.mark.slow
def test_onnx_with_other_classes_than_the_checkpoint_is_refused(workspace, tmp_path, cli, one_line_error):
    two_class = tmp_path / "two-class.pt"
    config = ModelConfig(num_classes=2, base_channels=4, depth=2)
    state = {
        "model": build_model(config).state_dict(),
        "config": config.to_dict(),
        "classes": ["bg", "fg"],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    save_checkpoint(two_class, state)
    data = write_synth(tmp_path / "data", SynthSpec(num_train=2, num_val=2, size=32))
    result = cli(
        "verify",
        str(workspace / "exported" / "tiny" / "model.onnx"),
        "--checkpoint",
        str(two_class),
        "--data",
        str(data),
    )
    one_line_error(result, "model.onnx: classes", "differ from the checkpoint's ['bg', 'fg']")


# --- data validation -------------------------------------------------------------------------


def make_split(root: Path, split: str, labels: dict[str, np.ndarray], size: tuple[int, int] | None = None) -> None:
    """One split of the folder layout: an RGB PNG per label, of the label's size unless `size` is given."""
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "labels").mkdir(parents=True, exist_ok=True)
    for stem, label in labels.items():
        height, width = size or label.shape
        Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(root / split / "images" / f"{stem}.png")
        Image.fromarray(label).save(root / split / "labels" / f"{stem}.png")


@pytest.fixture
def good_data(tmp_path) -> Path:
    """Three classes (dataset.json), ignore 255, a few 12x10 pairs in train and val."""
    root = tmp_path / "data"
    label = np.zeros((10, 12), np.uint8)
    label[2:5, 3:7], label[6:8, 1:4], label[0, :] = 1, 2, 255
    make_split(root, "train", {"a": label, "b": label[::-1].copy()})
    make_split(root, "val", {"c": label})
    (root / "dataset.json").write_text(json.dumps({"classes": ["bg", "one", "two"], "ignore_index": 255}))
    return root


def test_scan_accepts_good_data_and_counts_pixels(good_data):
    calls = []
    report = scan_dataset(good_data, progress=lambda done, total, label: calls.append((done, total, label)))
    assert report.images == {"train": 2, "val": 1} and report.info.classes == ("bg", "one", "two")
    assert report.label_pixels == {0: 3 * (120 - 12 - 12 - 6), 1: 3 * 12, 2: 3 * 6, 255: 3 * 12}
    assert calls[-1] == (3, 3, "checking data")


def test_scan_reads_16bit_and_palette_labels(tmp_path):
    root = tmp_path / "wide"
    values = np.array([[0, 1], [2, 255]], np.uint8)
    make_split(root, "train", {"w": values.astype(np.uint16)})  # 16-bit PNG
    palette = Image.fromarray(values, mode="P")
    palette.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [255, 255, 255] * 253)
    make_split(root, "val", {"p": values})
    palette.save(root / "val" / "labels" / "p.png")
    assert scan_dataset(root).label_pixels == {0: 2, 1: 2, 2: 2, 255: 2}
    wide = np.array([[0, 300], [1, 1]], np.uint16)  # 300 & 0xFF = 44: an 8-bit read would report 44
    make_split(root, "train", {"w": wide})
    with pytest.raises(DataError, match=r"w\.png: 1 pixels have value 300"):
        scan_dataset(root, info=DatasetInfo(("a", "b"), 255))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DATA_PROBLEMS = {
    "truncated image": (lambda r: _truncate(r / "train/images/a.png"), r"train/images/a\.png: not a readable image"),
    "non-image file": (lambda r: (r / "train/images/a.png").write_text("hello"), r"a\.png: not a readable image"),
    "truncated jpeg": (
        lambda r: (
            (r / "train/images/a.png").unlink(),
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), np.uint8)).save(
                r / "train/images/a.jpg", quality=95
            ),
            _truncate(r / "train/images/a.jpg"),
        ),
        r"a\.jpg: not a readable image",
    ),
    "truncated label": (lambda r: _truncate(r / "val/labels/c.png"), r"val/labels/c\.png: not a readable label"),
    "image without label": (lambda r: (r / "train/labels/b.png").unlink(), r"train/images/b\.png: image has no label"),
    "label without image": (lambda r: (r / "val/images/c.png").unlink(), r"val/labels/c\.png: label has no image"),
    "sizes differ": (
        lambda r: Image.fromarray(np.zeros((10, 13, 3), np.uint8)).save(r / "train/images/b.png"),
        r"b\.png: label is 12x10 but its image b\.png is 13x10",
    ),
    "value beyond dataset.json": (
        lambda r: Image.fromarray(np.pad(np.full((2, 3), 7, np.uint8), ((0, 8), (0, 9)))).save(r / "val/labels/c.png"),
        r"val/labels/c\.png: 6 pixels have value 7, neither a class id \(0\.\.2, from .*dataset\.json\) "
        r"nor the ignore index 255",
    ),
    "empty split": (lambda r: [p.unlink() for p in (r / "val").rglob("*.png")], r"val/images: split 'val' is empty"),
    "missing folder": (lambda r: shutil.rmtree(r / "val" / "labels"), r"val/labels: folder not found"),
    "dataset.json with fewer classes": (
        lambda r: (r / "dataset.json").write_text(json.dumps({"classes": ["bg", "one"], "ignore_index": 255})),
        r"pixels have value 2, neither a class id \(0\.\.1, from .*dataset\.json\)",
    ),
}


@pytest.mark.parametrize("case", list(DATA_PROBLEMS))
def test_scan_names_the_file_and_the_problem(case, good_data):
    damage, message = DATA_PROBLEMS[case]
    damage(good_data)
    with pytest.raises(DataError, match=message):
        scan_dataset(good_data)


def test_scan_counts_the_other_problems(good_data):
    for stem in ("a", "b"):
        (good_data / "train" / "images" / f"{stem}.png").write_text("not an image")
    with pytest.raises(DataError, match=r"a\.png: not a readable image .*\(and 1 more problem in this dataset\)"):
        scan_dataset(good_data)


@pytest.mark.slow
def test_train_and_eval_stop_on_bad_labels_before_any_work(good_data, tiny_checkpoint, tmp_path, cli, one_line_error):
    DATA_PROBLEMS["value beyond dataset.json"][0](good_data)
    before = snapshot(good_data, tiny_checkpoint)
    runs = tmp_path / "runs"
    result = cli("train", "--data", str(good_data), *TINY_TRAIN, "--epochs", "1", "--out", str(runs))
    one_line_error(result, "c.png: 6 pixels have value 7", "dataset.json")
    assert not runs.exists() and snapshot(good_data, tiny_checkpoint) == before
    (good_data / "dataset.json").unlink()  # eval judges labels by the checkpoint's four classes instead
    before = snapshot(good_data, tiny_checkpoint)
    result = cli(
        "eval", str(tiny_checkpoint), "--data", str(good_data), "--device", "cpu", "--json", str(tmp_path / "r.json")
    )
    one_line_error(result, "c.png: 6 pixels have value 7", "0..3, from", "best.pt")
    assert not (tmp_path / "r.json").exists() and snapshot(good_data, tiny_checkpoint) == before


# --- crash safety ----------------------------------------------------------------------------


def test_unwritable_target_is_an_output_error_and_keeps_the_old_file(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputError, match="folder: is a folder"):
        atomic_write_text(tmp_path / "folder", "x")
    (tmp_path / "file").write_text("old")
    with pytest.raises(OutputError, match=r"file/new\.txt: cannot write here"):
        atomic_write_text(tmp_path / "file" / "new.txt", "x")
    assert (tmp_path / "file").read_text() == "old"


def test_metrics_log_survives_a_partial_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"epoch": 1})
    append_jsonl(log, {"epoch": 2, "name": "é"})
    with open(log, "ab") as handle:  # a crash in the middle of a write
        handle.write('{"epoch": 3, "name": "\u00e9'.encode()[:-1])
    assert read_jsonl(log) == [{"epoch": 1}, {"epoch": 2, "name": "é"}]
    append_jsonl(log, {"epoch": 3})
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2, 3]


def tiny_set(root: Path, num_train: int = 16) -> Path:
    return write_synth(root, SynthSpec(num_train=num_train, num_val=2, size=32, seed=5))


def start_training(data: Path, out: Path, epochs: int, *extra: str) -> subprocess.Popen:
    args = [
        "train",
        "--data",
        str(data),
        *TINY_TRAIN,
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--name",
        "run",
        *extra,
    ]
    # A shell without job control starts background jobs with SIGINT ignored, and children inherit that
    # (Python then installs no KeyboardInterrupt handler): give the run the disposition a terminal gives it.
    return subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_epochs(log: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(read_jsonl(log)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigint_keeps_the_last_finished_epoch_exits_130_and_resume_continues(tmp_path, cli, one_line_error):
    data, out = tiny_set(tmp_path / "data"), tmp_path / "runs"
    process = start_training(
        data, out, 1000
    )  # more epochs than it gets to run: it is still running when the signal comes
    wait_for_epochs(out / "run" / "metrics.jsonl", 2, process)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"SIGINT did not stop training within 60 s: {process.communicate()}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    line = one_line_error(result, "interrupted in epoch", "run/last.pt", "--resume", code=130)
    state = load_checkpoint(out / "run" / "last.pt")
    saved_epoch = state["epoch"]  # the last finished epoch: epoch 2 may be logged before its last.pt lands
    assert saved_epoch >= 1 and f"holds epoch {saved_epoch};" in line
    assert "interrupted" not in state["metrics"]  # a finished epoch's record, not a partial one
    result = cli("train", "--resume", str(out / "run" / "last.pt"), "--epochs", str(saved_epoch + 1), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(out / "run" / "last.pt")["epoch"] == saved_epoch + 1
    assert [r["epoch"] for r in read_jsonl(out / "run" / "metrics.jsonl")] == list(range(1, saved_epoch + 2))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [7])
def test_kill_9_at_a_random_moment_then_resume_finishes(tmp_path, seed, cli):
    rng = random.Random(seed)  # a fixed seed: a failure is rerun at the same epoch and offset
    data, out = tiny_set(tmp_path / "data"), tmp_path / "runs"
    run = out / "run"
    process = start_training(data, out, 1000)  # far more than it gets to run before the kill
    wait_for_epochs(run / "metrics.jsonl", rng.randint(1, 10), process)
    time.sleep(rng.uniform(0, 0.4))  # anywhere in an epoch: training, evaluating or writing files
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL, f"seed {seed}: the run ended before the kill"
    state = load_checkpoint(run / "last.pt")  # the previous or the new file, whole
    with open(run / "metrics.jsonl", "ab") as handle:  # and a log line cut short, as a crash mid-write leaves
        handle.write(b'{"epoch": 99, "train_lo')
    target = state["epoch"] + 3
    result = cli("train", "--resume", str(run / "last.pt"), "--epochs", str(target), "--device", "cpu")
    assert result.returncode == 0, f"seed {seed}, killed at epoch {state['epoch']}: {result.stderr}"
    assert load_checkpoint(run / "last.pt")["epoch"] == target
    load_model(run / "last.pt")
    load_model(run / "best.pt")
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, target + 1)), f"seed {seed}"
    assert not list(run.glob(".*.tmp"))


@pytest.mark.slow
def test_absurd_lr_stops_with_one_line_and_keeps_the_last_good_epoch(tmp_path, cli, one_line_error):
    data, out = tiny_set(tmp_path / "data", num_train=8), tmp_path / "runs"
    result = cli(
        "train", "--data", str(data), *TINY_TRAIN, "--epochs", "30", "--lr", "1e6", "--out", str(out), "--name", "run"
    )
    line = one_line_error(result, "training stopped in epoch", "loss became", "try a lower --lr")
    stopped = int(line.split("training stopped in epoch ")[1].split(":")[0])
    assert stopped >= 2, line  # the first epochs stay finite, so there is a good checkpoint to keep
    assert f"run/last.pt (epoch {stopped - 1}) is kept unchanged" in line
    assert load_checkpoint(out / "run" / "last.pt")["epoch"] == stopped - 1
    assert all(
        torch.isfinite(t).all()
        for t in load_model(out / "run" / "best.pt").model.state_dict().values()
        if t.is_floating_point()
    )
    assert len(read_jsonl(out / "run" / "metrics.jsonl")) == stopped - 1


@pytest.mark.slow
def test_non_finite_loss_on_resume_leaves_checkpoints_untouched(tmp_path, interrupted_run, cli, one_line_error):
    data = tiny_set(tmp_path / "data", num_train=8)
    run = interrupted_run(data, tmp_path / "runs", epochs=3, stop_in_epoch=2)
    state = load_checkpoint(run / "last.pt")  # weights gone bad (as after an overflow): the loss is NaN at once
    next(t for t in state["model"].values() if t.is_floating_point()).fill_(float("nan"))
    save_checkpoint(run / "last.pt", state)
    before = snapshot(run)
    result = cli("train", "--resume", str(run / "last.pt"), "--device", "cpu")
    one_line_error(
        result, "training stopped in epoch 2: loss became nan at step 1", "last.pt (epoch 1) is kept unchanged"
    )
    assert snapshot(run) == before
