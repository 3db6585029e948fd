import itertools
import json
import shutil
import subprocess
import sys

import pytest
import torch

from unet_edge.checkpoint import load_checkpoint, load_model, save_checkpoint
from unet_edge.config import ModelConfig, TrainConfig, schedule_epochs
from unet_edge.errors import CheckpointError, TrainingError, TrainingInterrupted
from unet_edge.io import read_jsonl
from unet_edge.train import TrainHooks, fit


@pytest.mark.slow
def test_one_epoch_train_subprocess_writes_run_folder(tiny_data, tmp_path, cli):
    result = cli(
        "train",
        "--data",
        str(tiny_data),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--base-channels",
        "4",
        "--depth",
        "2",
        "--out",
        str(tmp_path),
        "--name",
        "one",
        "--device",
        "cpu",
        in_process=False,
    )
    assert result.returncode == 0, result.stderr
    run = tmp_path / "one"
    for name in ("best.pt", "last.pt", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and {"epoch", "train_loss", "train_miou", "miou", "per_class_iou"} <= set(records[0])
    assert 0.0 <= records[0]["miou"] <= 1.0 and 0.0 <= records[0]["train_miou"] <= 1.0
    assert "train mIoU" in result.stderr  # the epoch lines
    assert "best val mIoU" in result.stdout and "circle" in result.stdout
    # the embedded set declares its classes mirror-symmetric, so the default flip is on and said so in one line
    assert "says the classes look the same mirrored" in result.stderr and "--hflip 0 turns it off" in result.stderr


@pytest.mark.slow
def test_checkpoint_is_plain_data_and_round_trips(tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, weights_only=True)
    assert state["classes"] == ["background", "circle", "square", "triangle"]
    assert state["config"]["base_channels"] == 4 and len(state["mean"]) == 3
    assert "optimizer" in state and "epoch" in state
    first = load_model(tiny_checkpoint)
    copy = tmp_path / "copy.pt"
    save_checkpoint(copy, state)
    second = load_model(copy)
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        assert torch.equal(first.model(x), second.model(x))


@pytest.mark.slow
def test_resume_continues_from_saved_epoch(tiny_data, tmp_path, interrupted_run):
    run = interrupted_run(tiny_data, tmp_path, epochs=3, stop_in_epoch=2)
    resumed = fit(TrainConfig(epochs=3, device="cpu", resume=str(run / "last.pt")))
    assert resumed.run_dir == run
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


class Notes(TrainHooks):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def on_note(self, message: str) -> None:
        self.notes.append(message)


@pytest.mark.slow
def test_the_checkpoint_records_where_its_epochs_ran_and_a_resume_elsewhere_says_so(
    tiny_data, tmp_path, interrupted_run
):
    here = torch.backends.cpu.get_cpu_capability()
    same, moved = (interrupted_run(tiny_data, tmp_path / name, epochs=3, stop_in_epoch=2) for name in ("same", "moved"))
    assert load_checkpoint(same / "last.pt")["environments"] == [
        {
            "from_epoch": 0,
            "torch": str(torch.__version__),
            "device": "cpu",
            "cpu_capability": here,
            "threads": torch.get_num_threads(),
        }
    ]
    # resumed on the same machine: nothing to say, and no second record
    hooks = Notes()
    fit(TrainConfig(device="cpu", resume=str(same / "last.pt")), hooks)
    assert not [note for note in hooks.notes if "continues" in note]
    assert len(load_checkpoint(same / "last.pt")["environments"]) == 1
    # epoch 1 as if computed on another CPU kind: the resume says that this run will not repeat an unbroken one
    other = "AVX2" if here != "AVX2" else "AVX512"
    state = load_checkpoint(moved / "last.pt")
    state["environments"][0]["cpu_capability"] = other
    save_checkpoint(moved / "last.pt", state)
    hooks = Notes()
    fit(TrainConfig(device="cpu", resume=str(moved / "last.pt")), hooks)
    said = "this run continues at epoch 2 with CPU kernels " + f"{other} -> {here}: its figures will not repeat"
    assert said in " ".join(hooks.notes)
    sessions = load_checkpoint(moved / "last.pt")["environments"]
    assert [(s["from_epoch"], s["cpu_capability"]) for s in sessions] == [(0, other), (1, here)]


def test_environment_change_names_what_differs():
    from unet_edge.device import environment_change

    cpu = {"torch": "2.14.1", "device": "cpu", "cpu_capability": "AVX512", "threads": 2}
    assert environment_change(cpu, dict(cpu)) is None
    assert environment_change(cpu, {**cpu, "threads": 1}) == "threads 2 -> 1"
    gpu = {"torch": "2.11.0", "device": "cuda", "gpu": "NVIDIA H100"}
    assert environment_change(cpu, gpu) == (
        "PyTorch 2.14.1 -> 2.11.0, device cpu -> cuda, GPU None -> NVIDIA H100, CPU kernels AVX512 -> None, "
        "threads 2 -> None"
    )


@pytest.mark.slow
def test_eval_cli_json_matches_training_metric(tiny_run, tiny_data, tmp_path, cli):
    out = tmp_path / "eval.json"
    result = cli(
        "eval", str(tiny_run.run_dir / "best.pt"), "--data", str(tiny_data), "--json", str(out), "--device", "cpu"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["per_class_iou"]) == {"background", "circle", "square", "triangle"}
    best_epoch_record = tiny_run.history[tiny_run.best_epoch - 1]
    assert report["miou"] == pytest.approx(best_epoch_record["miou"], abs=1e-9)


def test_eval_without_runs_is_a_clean_error(tmp_path, cli):
    result = cli("eval", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    assert "no run with a best.pt" in result.stderr


def test_not_a_checkpoint_is_a_clean_error(tmp_path, cli):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.pt: not a readable checkpoint"):
        load_checkpoint(bad)
    result = cli("eval", str(bad))
    assert result.returncode == 1 and "bad.pt" in result.stderr and "Traceback" not in result.stderr


def test_a_truncated_checkpoint_says_so(tmp_path):
    state = {"model": {"w": torch.zeros(64, 64)}}
    whole = tmp_path / "whole.pt"
    torch.save(state, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable checkpoint \(truncated or corrupt archive\)$"):
        load_checkpoint(cut)


def test_help_does_not_import_torch():
    code = "import sys; from unet_edge_cli.main import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_installed_entry_point_runs():
    import shutil

    exe = shutil.which("unet-edge") or str(__import__("pathlib").Path(sys.executable).with_name("unet-edge"))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "eval" in out.stdout


@pytest.mark.slow
def test_cached_and_uncached_training_agree(tiny_data, tmp_path, trainer):
    """The decode cache changes where pixels come from, never which: same seed, same run."""
    cached = trainer(tiny_data, tmp_path, name="cached", epochs=1, cache=True)
    uncached = trainer(tiny_data, tmp_path, name="uncached", epochs=1, cache=False)
    for a, b in zip(cached.history, uncached.history):
        assert a["train_loss"] == b["train_loss"] and a["miou"] == b["miou"]
        assert 0 <= a["data_time_s"] <= a["epoch_time_s"]
    weights = load_checkpoint(cached.run_dir / "last.pt")["model"]
    for name, value in load_checkpoint(uncached.run_dir / "last.pt")["model"].items():
        assert torch.equal(weights[name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("stop_epoch", [1, 2])
def test_interrupt_mid_epoch_keeps_the_last_finished_epoch(tiny_data, tmp_path, stop_epoch):
    class CtrlC(TrainHooks):
        def on_step(self, epoch, step, loss):
            if epoch + 1 == stop_epoch and step == 1:
                raise KeyboardInterrupt

        def on_epoch_end(self, record):
            self.last_bytes = (tmp_path / "i" / "last.pt").read_bytes()

    hooks = CtrlC()
    config = TrainConfig(
        data=str(tiny_data),
        epochs=3,
        batch_size=4,
        image_size=32,
        model=ModelConfig(base_channels=4, depth=2),
        out=str(tmp_path),
        name="i",
        device="cpu",
    )
    with pytest.raises(TrainingInterrupted) as error:
        fit(config, hooks)
    if stop_epoch == 1:
        assert "nothing was saved" in str(error.value) and not (tmp_path / "i" / "last.pt").exists()
    else:
        assert f"holds epoch {stop_epoch - 1};" in str(error.value)
        assert (tmp_path / "i" / "last.pt").read_bytes() == hooks.last_bytes  # untouched by the interrupt


@pytest.mark.slow
def test_resume_without_epochs_finishes_the_saved_run(tiny_data, tmp_path, interrupted_run, cli):
    run = interrupted_run(tiny_data, tmp_path, epochs=3, stop_in_epoch=3)
    result = cli("train", "--resume", str(run / "last.pt"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run / "last.pt")["epoch"] == 3  # the run's own 3 epochs, not the default 20
    again = cli("train", "--resume", str(run / "last.pt"), "--device", "cpu")
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: nothing to train: {run / 'last.pt'} is already at epoch 3 of 3"


@pytest.mark.slow
def test_extending_a_run_keeps_the_learning_rate_decaying(tiny_data, tmp_path, interrupted_run):
    run = interrupted_run(tiny_data, tmp_path, epochs=4, stop_in_epoch=3)
    before = [r["lr"] for r in read_jsonl(run / "metrics.jsonl")]
    result = fit(TrainConfig(epochs=8, device="cpu", resume=str(run / "last.pt")))
    after = [r["lr"] for r in result.history]
    assert len(before) == 2 and len(after) == 6
    assert after[0] <= before[-1]  # no jump back up at the resume
    assert all(later <= earlier for earlier, later in itertools.pairwise(after))
    assert after[-1] == pytest.approx(0.0, abs=1e-12)  # and it still decays to zero at the new end


@pytest.mark.slow
def test_extending_a_finished_run_is_refused(tiny_run, tmp_path, cli):
    result = cli("train", "--resume", str(tiny_run.run_dir / "last.pt"), "--epochs", "5", "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "finished its learning-rate decay (lr 0)" in result.stderr and "start a new run" in result.stderr


@pytest.mark.slow
def test_resume_refuses_explicit_options_that_differ_from_the_saved_run(tiny_data, tmp_path, interrupted_run, cli):
    run = interrupted_run(tiny_data, tmp_path, epochs=3, stop_in_epoch=2, lr=0.01)
    last = run / "last.pt"
    before = last.read_bytes()
    # an explicit --lr that differs from the run's 0.01
    result = cli("train", "--resume", str(last), "--lr", "0.001", "--depth", "3", "--upsample", "bilinear")
    assert result.returncode == 1
    line = result.stderr.strip()
    assert line.startswith(f"error: {last}: a resumed run keeps its saved settings; drop ")
    assert (
        "--lr 0.001 (saved: 0.01)" in line
        and "--depth 3 (saved: 2)" in line
        and "--upsample bilinear (saved: transpose)" in line
    )
    assert last.read_bytes() == before
    moved = tmp_path / "moved-data"
    shutil.copytree(tiny_data, moved)
    same = cli("train", "--resume", str(last), "--lr", "0.01", "--data", str(moved), "--device", "cpu")
    assert same.returncode == 0, same.stderr  # options equal to the saved ones, and a new dataset location, are fine
    state = load_checkpoint(last)
    assert state["epoch"] == 3 and state["data_root"] == str(moved) and state["train_config"]["lr"] == 0.01


@pytest.mark.parametrize("option", ["--upsample", "--block-order"])
def test_a_typo_in_a_choice_is_rejected_before_any_data_is_read(option, tmp_path, cli):
    result = cli("train", option, "bilinaer", "--data", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert f"Invalid value for '{option}'" in result.stderr and "dataset folder not found" not in result.stderr
    with pytest.raises(ValueError, match="must be one of"):
        ModelConfig(upsample="bilinaer")


@pytest.mark.slow
def test_a_checkpoint_of_the_earlier_layout_resumes(tiny_data, tmp_path, interrupted_run):
    """Earlier checkpoints kept the model settings flat in train_config and no schedule fields."""
    run = interrupted_run(tiny_data, tmp_path, epochs=3, stop_in_epoch=2)
    state = load_checkpoint(run / "last.pt")
    nested = state["train_config"].pop("model")
    state["train_config"].update(
        {k: nested[k] for k in ("base_channels", "depth", "num_convs", "upsample", "block_order")}
    )
    state["lr_scheduler"]["lr_lambdas"] = [None]
    save_checkpoint(run / "last.pt", state)
    result = fit(TrainConfig(device="cpu", resume=str(run / "last.pt")))
    assert [r["epoch"] for r in result.history] == [2, 3]
    assert load_checkpoint(run / "last.pt")["config"]["base_channels"] == 4


@pytest.mark.slow
def test_ctrl_c_during_the_checkpoint_write_names_the_epoch_last_pt_holds(tiny_data, tmp_path, monkeypatch, trainer):
    """SIGINT that arrives while last.pt is written is held until the epoch's bookkeeping is done."""
    import signal

    from unet_edge import runs

    real_save = runs.save_checkpoint

    def save_then_interrupt(path, state):
        real_save(path, state)
        if path.name == "last.pt" and state["epoch"] == 2:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(runs, "save_checkpoint", save_then_interrupt)
    # Python's own Ctrl-C handler, whatever an earlier test or library left installed in this process.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(TrainingInterrupted, match="holds epoch 2;"):
            trainer(tiny_data, tmp_path, name="c", epochs=4)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert load_checkpoint(tmp_path / "c" / "last.pt")["epoch"] == 2
    assert [r["epoch"] for r in read_jsonl(tmp_path / "c" / "metrics.jsonl")] == [1, 2]


def test_cpu_training_gradients_match_float64():
    """The layout `fit` trains in on the CPU gives the gradients float64 gives (PyTorch's channels_last
    BatchNorm on the CPU put 5-8 % errors into conv bias gradients, which cost val mIoU)."""
    import copy

    from unet_edge.device import place_model, prefers_channels_last
    from unet_edge.model import build_model
    from unet_edge.transforms import BatchNormalize

    torch.manual_seed(0)
    model = build_model(ModelConfig(base_channels=8, depth=3, num_classes=5)).train()
    images = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8)
    masks = torch.randint(0, 5, (4, 48, 48))
    cpu = torch.device("cpu")

    def gradients(net: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        torch.nn.functional.cross_entropy(net(x), masks).backward()
        return {name: p.grad.double() for name, p in net.named_parameters()}

    trained = place_model(copy.deepcopy(model), cpu, training=True)
    got = gradients(trained, BatchNormalize(channels_last=prefers_channels_last(cpu, training=True))(images))
    expected = gradients(copy.deepcopy(model).double(), BatchNormalize()(images).double())
    worst = max(((got[n] - expected[n]).norm() / expected[n].norm().clamp_min(1e-12)).item() for n in expected)
    assert worst < 1e-3, worst


@pytest.mark.slow
def test_the_running_train_miou_is_that_of_the_predictions_each_step_made(tiny_data):
    """With the weights held still (learning rate 0), the epoch's running confusion equals the one counted again over
    the same batches: every crop's prediction, and nothing of the padding or the ignore band."""
    from unet_edge.loaders import training_data
    from unet_edge.metrics import ConfusionMatrix
    from unet_edge.model import build_model
    from unet_edge.train import train_one_epoch

    torch.manual_seed(0)
    data = training_data(
        TrainConfig(data=str(tiny_data), batch_size=4, image_size=40, device="cpu"), torch.device("cpu")
    )
    batches = list(data.train_loader)
    model = build_model(ModelConfig(num_classes=len(data.classes), base_channels=4, depth=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    running = ConfusionMatrix(len(data.classes))
    train_one_epoch(
        model,
        batches,
        optimizer,
        scheduler,
        lambda logits, masks: logits.square().mean(),  # any finite loss: at learning rate 0 the weights stay
        torch.device("cpu"),
        normalize=data.normalize,
        confusion=running,
    )
    again = ConfusionMatrix(len(data.classes), ignore_index=data.ignore_index)
    with torch.no_grad():
        for images, masks in batches:
            logits = model(data.normalize(images))  # train mode: the batch's own statistics, as in the step
            keep = masks >= 0  # crop padding is not a pixel
            again.update(logits.argmax(1)[keep], masks[keep])
    assert torch.equal(running.matrix, again.matrix) and int(running.matrix.sum()) > 0


def test_every_training_setting_says_how_resuming_treats_it():
    from unet_edge.train import RESUME_OVERRIDES, RUN_SETTINGS, SESSION_SETTINGS

    groups = [set(RUN_SETTINGS), set(RESUME_OVERRIDES), set(SESSION_SETTINGS)]
    assert set.union(*groups) == set(TrainConfig().settings())
    assert sum(len(g) for g in groups) == len(set.union(*groups))  # and only one way


@pytest.mark.slow
def test_a_narrow_model_leaves_the_plateau_early_at_the_learning_rate_train_picks_for_its_width(tiny_data, tmp_path):
    """A base-4 U-Net at the learning rate that suits wide ones (1e-3) still predicts next to nothing right after 3
    epochs on every seed; at the one `train` picks for its width, every seed has left that plateau by then."""

    def first_epochs(seed: int, lr: float | None) -> list[float]:
        config = TrainConfig(
            data=str(tiny_data),
            epochs=3,
            batch_size=8,
            image_size=32,
            lr=lr,
            seed=seed,
            device="cpu",
            model=ModelConfig(base_channels=4, depth=2),
            out=str(tmp_path),
            name=f"s{seed}-{lr}",
        )
        return [record["miou"] for record in fit(config).history]

    assert TrainConfig(model=ModelConfig(base_channels=4, depth=2)).peak_lr > 1e-3
    for seed in (0, 1):
        assert max(first_epochs(seed, 1e-3)) < 0.1
        assert max(first_epochs(seed, None)) > 0.15


def test_the_default_schedule_sees_enough_crops_on_a_small_set_and_keeps_20_epochs_on_a_large_one():
    """Without --epochs a run on a small training set gets the crops a student needs to level off (60 epochs of the
    benchmark sets' 240 images, where 20 left every student still climbing and its seed deciding where it stopped);
    a set of 720 images or more keeps 20 epochs, and a tiny one is capped."""
    assert schedule_epochs(240) == schedule_epochs(240, 16) == schedule_epochs(240, 32) == 60
    assert schedule_epochs(512) == 29
    assert schedule_epochs(720) == schedule_epochs(10_000) == 20
    assert schedule_epochs(3) == 200
    assert all(schedule_epochs(n) * n >= 14_400 for n in range(72, 720))
    # a narrower model sees 16 / base times as many crops: base 8 twice as many, base 4 up to the cap
    assert schedule_epochs(240, 8) == 120 and schedule_epochs(240, 12) == 80 and schedule_epochs(240, 4) == 200
    assert schedule_epochs(10_000, 8) == 20 and schedule_epochs(1_000, 8) == 29


@pytest.mark.slow
def test_a_run_without_epochs_trains_and_records_the_schedule_of_its_training_set(tiny_data, tmp_path, monkeypatch):
    """`fit` asks the schedule for the size of the training set (24 images here) and the model's width, trains that
    many epochs, and stores the number, so that a resume without --epochs finishes that run rather than a new
    default."""
    import unet_edge.train

    asked: list[tuple[int, int]] = []

    def schedule(images: int, base_channels: int) -> int:
        asked.append((images, base_channels))
        return 2

    monkeypatch.setattr(unet_edge.train, "schedule_epochs", schedule)
    config = TrainConfig(
        data=str(tiny_data),
        batch_size=8,
        image_size=32,
        device="cpu",
        model=ModelConfig(base_channels=4, depth=2),
        out=str(tmp_path),
        name="default-schedule",
    )
    assert config.epochs is None
    result = fit(config)
    assert asked == [(24, 4)]
    assert len(result.history) == 2
    stored = json.loads((result.run_dir / "config.json").read_text())
    assert stored["epochs"] == 2 and stored["hflip"] == 0.5  # the embedded set is mirror-symmetric
    assert load_checkpoint(result.run_dir / "last.pt")["train_config"]["epochs"] == 2
    assert load_checkpoint(result.run_dir / "last.pt")["train_config"]["hflip"] == 0.5
    with pytest.raises(TrainingError, match="already at epoch 2 of 2"):
        fit(TrainConfig(device="cpu", resume=str(result.run_dir / "last.pt")))
    assert asked == [(24, 4)]
