"""Faults that real machines have: a full disk, two runs started at once, kill -9 in the middle of an export,
images too large to decode. Each one ends in one line and a non-zero exit, and nothing already written is lost
or half-written.

The full-disk cases run on a small tmpfs where the tests run as root and may mount one (as CI does), and
otherwise on a write that fails with ENOSPC half-way through, through the same atomic-write code.
"""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_edge.artifact import check_manifest_sha256, read_manifest
from unet_edge.checkpoint import load_checkpoint
from unet_edge.errors import OutputError

CLI = [sys.executable, "-m", "unet_edge_cli.main"]
TINY_TRAIN = ["--batch-size", "8", "--image-size", "32", "--base-channels", "4", "--depth", "2", "--device", "cpu"]


def leftovers(root: Path) -> list[str]:
    """Temporary files and staging folders under `root` (none may survive a failed or finished write)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp") or ".export-" in p.name)


def assert_export_consistent(folder: Path, allow_empty: bool = False) -> dict:
    """The folder's manifest loads, and every file it names is there with its sha256 (companions included)."""
    manifest = read_manifest(folder)
    assert manifest is not None and (allow_empty or manifest["artifacts"]), folder
    for entry in manifest["artifacts"]:
        check_manifest_sha256(folder / entry["file"], entry)
    return manifest


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(kb)`: a tmpfs of that size, unmounted after the test; skips where none can be mounted."""
    mounts = []

    def make(kb: int) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root")
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(point)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(disk: Path, leave_kb: int) -> None:
    """Fill `disk` until about `leave_kb` KB are free."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave_kb * 1024))


@pytest.mark.slow
def test_export_on_a_full_disk_is_one_line_and_keeps_the_previous_export(
    tiny_checkpoint, small_disk, cli, one_line_error
):
    disk = small_disk(2048)
    first = cli(
        "export", str(tiny_checkpoint), "--format", "onnx", "--out", str(disk), "--name", "e", "--parity-images", "0"
    )
    assert first.returncode == 0, first.stderr
    before = assert_export_consistent(disk / "e")
    fill(disk, leave_kb=40)
    # ONNX's writer (the first format written), then in a real process TorchScript's, whose native writer used to
    # abort the process (exit 134) on a full disk. model.onnx and model.ts are each over 40 KB.
    in_process = cli(
        "export", str(tiny_checkpoint), "--format", "onnx", "--out", str(disk), "--name", "e", "--parity-images", "0"
    )
    native = subprocess.run(
        [
            *CLI,
            "export",
            str(tiny_checkpoint),
            "--format",
            "torchscript",
            "--out",
            str(disk),
            "--name",
            "e",
            "--parity-images",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    for result, file in ((in_process, "model.onnx"), (native, "model.ts")):
        line = one_line_error(result, str(disk / "e" / file), "the previous export, if any, is unchanged")
        assert "No space left on device" in line or "the device is full" in line, line
    assert leftovers(disk) == []
    assert assert_export_consistent(disk / "e") == before


@pytest.mark.slow
def test_checkpoint_write_failing_half_way_stops_training_and_keeps_the_last_epoch(
    tiny_data, tmp_path, trainer, monkeypatch
):
    """ENOSPC in the middle of epoch 2's first checkpoint write: one error naming the epoch last.pt keeps, and
    last.pt/best.pt
    still hold epoch 1, whole, with no temporary file beside them."""
    import unet_edge.checkpoint as checkpoint
    from unet_edge import io as unet_io
    from unet_edge.errors import TrainingError

    writes = []

    def failing_on_the_third(path, data):  # epoch 1 writes best.pt and last.pt; epoch 2 fails on best.pt
        writes.append(Path(path).name)
        if len(writes) < 3:
            return unet_io.atomic_write_bytes(path, data)

        def half_then_full(handle):
            handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return unet_io._atomic_write(path, half_then_full)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", failing_on_the_third)
    with pytest.raises(TrainingError) as caught:
        trainer(tiny_data, tmp_path / "runs", name="full", epochs=3)
    run = tmp_path / "runs" / "full"
    message = str(caught.value)
    assert message.startswith("training stopped in epoch 2: ") and "No space left on device" in message, message
    assert f"{run / 'last.pt'} (epoch 1) is kept unchanged" in message
    assert writes[:2] == ["best.pt", "last.pt"] and len(writes) == 3  # epoch 2's first write (best.pt if it improved)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and load_checkpoint(run / "best.pt")["epoch"] == 1
    assert leftovers(run) == []


@pytest.mark.slow
def test_training_on_a_full_disk_keeps_last_pt_loadable(tiny_data, small_disk, interrupted_run, one_line_error):
    disk = small_disk(1024)
    run = interrupted_run(tiny_data, disk, epochs=5, stop_in_epoch=4)  # last.pt holds epoch 3 of 5
    fill(disk, leave_kb=100)  # room for a metrics line, not for another checkpoint
    last = run / "last.pt"
    resumed = subprocess.run(
        [*CLI, "train", "--resume", str(last), "--device", "cpu"], capture_output=True, text=True, timeout=300
    )
    one_line_error(
        resumed, "training stopped in epoch 4", "No space left on device", f"{last} (epoch 3) is kept unchanged"
    )
    assert load_checkpoint(last)["epoch"] == 3
    assert leftovers(disk) == []


@pytest.mark.slow
def test_predict_and_bench_json_on_a_full_disk(tiny_checkpoint, tiny_data, small_disk, cli, one_line_error):
    disk = small_disk(512)
    masks = disk / "masks"
    images = tiny_data / "val" / "images"
    assert (
        cli(
            "predict", str(tiny_checkpoint), str(images), "--out", str(masks), "--limit", "1", "--no-overlay"
        ).returncode
        == 0
    )
    written = {p.name: p.read_bytes() for p in masks.iterdir()}
    report = disk / "bench.json"
    report.write_text('{"earlier": true}\n')
    fill(disk, leave_kb=1)
    result = cli("predict", str(tiny_checkpoint), str(images), "--out", str(masks), "--no-overlay")
    one_line_error(result, "cannot write (No space left on device)")
    bench = cli(
        "bench",
        str(tiny_checkpoint),
        "--batch-sizes",
        "1",
        "--image-size",
        "32",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--providers",
        "cpu",
        "--json",
        str(report),
    )
    one_line_error(bench, str(report), "No space left on device")
    assert json.loads(report.read_text()) == {"earlier": True}
    assert {p.name: p.read_bytes() for p in masks.iterdir() if p.name in written} == written
    assert leftovers(disk) == []


def test_runs_claimed_in_the_same_instant_get_their_own_folders(tmp_path):
    from unet_edge.runs import RunFolder

    start, claimed, errors = threading.Barrier(6), [], []

    def claim() -> None:
        start.wait()
        try:
            claimed.append(RunFolder.create(tmp_path, "same"))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(run.path.name for run in claimed) == ["same", "same-2", "same-3", "same-4", "same-5", "same-6"]
    for run in claimed:
        run.release()


@pytest.mark.slow
def test_two_train_commands_with_one_name_started_together_write_two_runs(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    command = [
        *CLI,
        "train",
        "--data",
        str(tiny_data),
        "--epochs",
        "1",
        *TINY_TRAIN,
        "--out",
        str(runs),
        "--name",
        "same",
    ]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert sorted(p.name for p in runs.iterdir()) == ["same", "same-2"]
    for run in runs.iterdir():
        assert load_checkpoint(run / "last.pt")["epoch"] == 1
        assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.slow
def test_resume_of_a_run_a_live_process_holds_is_refused_until_it_dies(
    tiny_data, tmp_path, interrupted_run, cli, one_line_error
):
    run = interrupted_run(tiny_data, tmp_path / "runs", epochs=2, stop_in_epoch=2)  # last.pt: epoch 1 of 2
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from unet_edge.runs import _lock_existing; from pathlib import Path; "
            "_lock_existing(Path(sys.argv[1]), sys.argv[1]); print('locked', flush=True); time.sleep(600)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = cli("train", "--resume", str(run / "last.pt"), "--device", "cpu")
        one_line_error(refused, "its run is being trained by another process", f"pid {holder.pid}")
        assert load_checkpoint(run / "last.pt")["epoch"] == 1
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the kernel frees the lock
        holder.wait()
    resumed = cli("train", "--resume", str(run / "last.pt"), "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


@pytest.mark.slow
def test_kill_9_during_export_keeps_the_previous_export_and_the_next_export_succeeds(
    tiny_checkpoint, exported_all, tmp_path, cli
):
    out = tmp_path / "exported"
    shutil.copytree(exported_all[0], out / "e")  # the previous export: every format
    before = assert_export_consistent(out / "e")
    proc = subprocess.Popen(
        [*CLI, "export", str(tiny_checkpoint), "--format", "all", "--out", str(out), "--name", "e"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not any((staging / "model.onnx").is_file() for staging in out.glob(".e.export-*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the export finished or stalled before it could be killed"
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert assert_export_consistent(out / "e") == before
    assert list(out.glob(".e.export-*.tmp"))  # what the killed process left
    again = cli(
        "export",
        str(tiny_checkpoint),
        "--format",
        "torchscript",
        "--out",
        str(out),
        "--name",
        "e",
        "--parity-images",
        "0",
    )
    assert again.returncode == 0, again.stderr
    manifest = assert_export_consistent(out / "e")
    assert {e["file"] for e in manifest["artifacts"]} == {e["file"] for e in before["artifacts"]}
    assert leftovers(out) == []


@pytest.mark.slow
def test_a_crash_between_two_moves_leaves_a_manifest_that_names_only_what_it_describes(
    tiny_checkpoint, exported_all, tmp_path, monkeypatch
):
    """The export moves its staged files in one by one; the manifest first drops the entries they replace."""
    import unet_edge.export as export
    from unet_edge.export import ExportOptions, run_export

    shutil.copytree(exported_all[0], tmp_path / "e")  # the previous export: every format
    options = ExportOptions(
        checkpoint=tiny_checkpoint, out=tmp_path, name="e", formats=("onnx", "torchscript"), parity_images=0
    )
    real_replace, moves = os.replace, []

    def crash_after_one(src, dst):
        if (
            Path(src).parent.name.startswith(".e.export-") and Path(dst).parent == tmp_path / "e"
        ):  # a move out of staging
            if moves:
                raise KeyboardInterrupt  # the process dies here
            moves.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", crash_after_one)  # os.replace itself: atomic writes go through it too
    with pytest.raises(KeyboardInterrupt):
        run_export(options)
    manifest = assert_export_consistent(tmp_path / "e", allow_empty=True)
    assert len(moves) == 1 and moves[0] not in {e["file"] for e in manifest["artifacts"]}


def bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A PNG whose header announces width x height RGB pixels, in a few hundred bytes (its data is cut short:
    a reader that trusted the header would try to allocate 2.7 GB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * (1 + 3 * width) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb_data(tiny_data, tmp_path_factory) -> Path:
    """The tiny set with one training and one validation image replaced by a 30000 x 30000 bomb."""
    root = tmp_path_factory.mktemp("bomb") / "data"
    shutil.copytree(tiny_data, root)
    for split in ("train", "val"):
        victim = sorted((root / split / "images").glob("*.png"))[0]
        bomb_png(victim)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "eval", "train", "verify", "calibration"])
def test_an_image_too_large_to_decode_is_one_line_naming_the_file_and_the_limit(
    command, bomb_data, tiny_checkpoint, exported_all, tmp_path, cli, one_line_error
):
    val_bomb = sorted((bomb_data / "val" / "images").glob("*.png"))[0]
    train_bomb = sorted((bomb_data / "train" / "images").glob("*.png"))[0]
    args, bomb = {
        "predict": (["predict", str(tiny_checkpoint), str(val_bomb), "--out", str(tmp_path / "p")], val_bomb),
        "eval": (["eval", str(tiny_checkpoint), "--data", str(bomb_data)], val_bomb),
        "train": (
            ["train", "--data", str(bomb_data), "--epochs", "1", *TINY_TRAIN, "--out", str(tmp_path / "runs")],
            train_bomb,
        ),
        "verify": (
            ["verify", str(exported_all[0] / "model.onnx"), "--data", str(bomb_data), "--num-images", "0"],
            val_bomb,
        ),
        "calibration": (
            [
                "export",
                str(tiny_checkpoint),
                "--format",
                "onnx",
                "--precision",
                "int8",
                "--calib-data",
                str(bomb_data),
                "--out",
                str(tmp_path / "x"),
                "--parity-images",
                "0",
            ],
            train_bomb,
        ),
    }[command]
    one_line_error(
        cli(*args),
        str(bomb),
        "30000 x 30000 = 900,000,000 pixels is over the limit of 67,108,864 pixels",
        "--max-pixels",
    )
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists() and not (tmp_path / "p").exists()


@pytest.mark.slow
def test_a_bad_calibration_image_stops_the_export_before_anything_is_converted(
    bomb_data, tiny_checkpoint, tmp_path, monkeypatch
):
    """int8 reads its calibration images right after loading the checkpoint, so a bad one costs no conversion."""
    from dataclasses import replace

    from unet_edge.errors import UNetEdgeError
    from unet_edge.export import ExportOptions, run_export
    from unet_edge.formats import FORMATS, Precision

    converted = []
    monkeypatch.setitem(FORMATS, "onnx", replace(FORMATS["onnx"], export=lambda request: converted.append(request)))
    options = ExportOptions(
        checkpoint=tiny_checkpoint,
        out=tmp_path / "x",
        formats=("onnx",),
        precisions=(Precision.FP32, Precision.INT8),
        calib_data=bomb_data,
        parity_images=0,
    )
    with pytest.raises(UNetEdgeError, match="is over the limit of"):
        run_export(options)
    assert converted == [] and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_max_pixels_sets_the_limit(tiny_checkpoint, tiny_data, tmp_path, cli, one_line_error):
    image = sorted((tiny_data / "val" / "images").glob("*.png"))[0]
    refused = cli("--max-pixels", "1000", "predict", str(tiny_checkpoint), str(image), "--out", str(tmp_path / "a"))
    one_line_error(refused, str(image), "48 x 48 = 2,304 pixels is over the limit of 1,000 pixels")
    allowed = cli("--max-pixels", "2304", "predict", str(tiny_checkpoint), str(image), "--out", str(tmp_path / "b"))
    assert allowed.returncode == 0, allowed.stderr
    assert np.array(Image.open(tmp_path / "b" / f"{image.stem}_mask.png")).shape == (48, 48)


@pytest.mark.slow
@pytest.mark.parametrize("value", [300, -1, True, "255", 1.5])
def test_dataset_json_ignore_index_outside_0_255_is_one_line(
    value, tiny_data, tiny_checkpoint, tmp_path, cli, one_line_error
):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "ignore_index": value}))
    one_line_error(
        cli("eval", str(tiny_checkpoint), "--data", str(root)),
        str(root / "dataset.json"),
        '"ignore_index" must be null or an integer in 0..255',
        json.dumps(value),
    )


def test_write_failed_names_the_file_and_the_free_space(tmp_path):
    from unet_edge.io import write_failed

    error = write_failed(
        tmp_path / "model.xml", RuntimeError("Exception from serialize.cpp:\nbasic_ios::clear: iostream error")
    )
    assert isinstance(error, OutputError)
    assert str(error).startswith(f"{tmp_path / 'model.xml'}: cannot write (basic_ios::clear: iostream error; ")
    assert "MB free on that device" in str(error) or "the device is full" in str(error)
