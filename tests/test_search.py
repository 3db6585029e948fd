"""`unet-edge search`: the latency table (measured, cached, keyed by the machine), the budget, the Optuna study on
SQLite and PostgreSQL with several workers, kill -9 then resume, and the front handed to deploy.

Tests that do not time anything read a latency table written here for this machine's key (the figures are
inputs of the budget, not results); the table's own test measures one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from unet_edge.formats import Precision
from unet_edge.search.latency import (
    LatencyTable,
    SearchError,
    TableSettings,
    machine_facts,
    measure_table,
    row_key,
    table_anchor,
)
from unet_edge.search.space import Architecture

SMALL, LARGE = Architecture(4, 2), Architecture(8, 2)
SPACE = [
    "--base-channels", "4,8", "--depths", "2", "--block-orders", "conv-bn-relu", "--upsample", "transpose",
    "--format", "torchscript", "--precision", "fp32", "--image-size", "32", "--table-seconds", "0.05",
    "--table-min-calls", "3", "--train-image-size", "32", "--train-batch-size", "8", "--device", "cpu",
    "--threads", "1",
]  # fmt: skip
SETTINGS = TableSettings(
    image_size=(32, 32), formats=("torchscript",), precisions=(Precision.FP32,), seconds=0.05, min_calls=3
)


def num_classes(data: Path) -> int:
    from unet_edge.data import scan_dataset

    return scan_dataset(data, splits=("val",)).info.num_classes


def table_row(arch: Architecture, classes: int, p50: float, **extra) -> dict:
    """A torchscript fp32 row of the latency table at 32x32, batch 1, timed at `p50` ms."""
    return {
        "architecture": arch.name,
        "num_classes": classes,
        "image_size": [32, 32],
        "batch_size": 1,
        "format": "torchscript",
        "precision": "fp32",
        "latency_ms": {"p50": p50, "p90": p50, "p99": p50, "mean": p50, "min": p50},
        "calls": 3,
        **extra,
    }


def write_table(runs: Path, data: Path, p50s: dict[Architecture, float], anchor_ms: float | None = None) -> Path:
    """A latency table for this machine at one thread (the key the CLI computes with --threads 1) with the given
    torchscript fp32 p50s (timed in one session with the anchor at `anchor_ms`, when given)."""
    threads = 1
    table = LatencyTable(runs / "search" / "latency-table.json", machine_facts(threads))
    classes = num_classes(data)
    settings = replace(SETTINGS, threads=threads)
    for arch, p50 in p50s.items():
        extra = {} if anchor_ms is None else {"anchor_ms": anchor_ms}
        table.rows[row_key(arch, "torchscript", "fp32", classes, settings)] = table_row(arch, classes, p50, **extra)
    table.path.parent.mkdir(parents=True)
    table.save()
    return table.path


def table_path(runs: Path) -> Path:
    return runs / "search" / "latency-table.json"


def load_trials(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def trained(trials):
    """The trials that trained (finished or pruned, not sharing another's result)."""
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and "same_as" not in t.user_attrs]


def check_trained_once(trials, epochs: int) -> None:
    """Each trained trial has its own run folder with one metrics line per epoch it ran, and its own parameters."""
    runs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(runs)) == len(runs), runs
    for trial in trials:
        lines = (Path(trial.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == (epochs if trial.state.name == "COMPLETE" else len(trial.intermediate_values))
        assert Path(trial.user_attrs["run_dir"]).name == f"{trial.number:03d}"
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params), params


def test_rows_timed_in_a_slow_session_are_scaled_by_its_anchor(tmp_path, tiny_data):
    """Two architectures timed in sessions minutes apart, the machine 1.5x slower during the second: their raw p50s
    say the second is slower; scaled by the anchor timed in each session (the table's median anchor over the
    session's), they compare as they would have in one session, and the raw figures are kept beside."""
    table = LatencyTable(tmp_path / "table.json", machine_facts(1))
    settings = replace(SETTINGS, threads=1)
    classes = num_classes(tiny_data)
    for arch, p50, anchor in ((SMALL, 2.0, 1.0), (LARGE, 2.4, 1.5)):  # LARGE really is 1.6 ms at the first speed
        table.rows[row_key(arch, "torchscript", "fp32", classes, settings)] = table_row(
            arch, classes, p50, anchor_ms=anchor
        )
    assert table.anchor_reference((32, 32), 1) == pytest.approx(1.25)
    small, large = table.best(SMALL, classes, settings), table.best(LARGE, classes, settings)
    assert small["latency_ms"]["p50"] == pytest.approx(2.0 * 1.25) and large["latency_ms"]["p50"] == pytest.approx(2.0)
    assert large["latency_ms"]["p50"] < small["latency_ms"]["p50"]  # raw, 2.4 > 2.0 said the opposite
    assert large["measured_latency_ms"]["p50"] == 2.4 and large["anchor_scale"] == pytest.approx(1.25 / 1.5)
    unanchored = {**table.rows[row_key(SMALL, "torchscript", "fp32", classes, settings)], "anchor_ms": None}
    assert table.anchored(unanchored) == unanchored  # a row without an anchor is read as timed


def test_the_reference_anchor_is_fixed_once_so_later_sessions_do_not_move_earlier_rows(tmp_path, tiny_data):
    """Before the table stores its reference, a third session timed at 3x the speed would move the median anchor
    from 1.25 to 1.5 and with it every earlier row's reading; once fixed, it does not, and the reference is kept
    in the file (a table without one, as written before references were stored, is read on its median)."""
    table = LatencyTable(tmp_path / "table.json", machine_facts(1))
    settings = replace(SETTINGS, threads=1)
    classes = num_classes(tiny_data)
    for arch, p50, anchor in ((SMALL, 2.0, 1.0), (LARGE, 2.4, 1.5)):
        table.rows[row_key(arch, "torchscript", "fp32", classes, settings)] = table_row(
            arch, classes, p50, anchor_ms=anchor
        )
    assert table.fix_references()  # stored
    assert table.references == {"32x32-b1": pytest.approx(1.25)}
    third = Architecture(6, 2)
    table.rows[row_key(third, "torchscript", "fp32", classes, settings)] = table_row(third, classes, 1.0, anchor_ms=3.0)
    assert table.anchor_reference((32, 32), 1) == pytest.approx(1.25)  # the median of the three would be 1.5
    assert table.best(SMALL, classes, settings)["latency_ms"]["p50"] == pytest.approx(2.5)
    assert not table.fix_references()  # fixed once: a later call keeps it
    table.save()
    reopened = LatencyTable.open(table.path, machine_facts(1), given=False)
    assert reopened.references == {"32x32-b1": pytest.approx(1.25)}
    assert reopened.best(third, classes, settings)["latency_ms"]["p50"] == pytest.approx(1.0 * 1.25 / 3.0)


@pytest.mark.slow
def test_latency_table_is_measured_once_per_machine(tiny_data, tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    settings = replace(SETTINGS, threads=1)
    table, classes = measure_table(
        (SMALL,), LatencyTable.open(path, machine_facts(1), given=False), settings, tiny_data
    )
    assert table.measured == 1
    row = table.best(SMALL, classes, settings)
    assert row is not None and row["latency_ms"]["p50"] > 0 and row["calls"] >= 3
    assert row["anchor_ms"] > 0  # the anchor was timed in the architecture's session
    saved = json.loads(path.read_text())["rows"]

    assert json.loads(path.read_text())["references"] == {"32x32-b1": row["anchor_ms"]}  # the scale, fixed
    again, _ = measure_table((SMALL,), LatencyTable.open(path, machine_facts(1), given=False), settings, tiny_data)
    assert again.measured == 0 and again.rows == saved  # reused, not measured again

    monkeypatch.setenv("UNET_EDGE_CPU_FLAGS", "avx2")  # another CPU kind: another machine key
    other, _ = measure_table((SMALL,), LatencyTable.open(path, machine_facts(1), given=False), settings, tiny_data)
    assert other.measured == 1
    assert json.loads(path.read_text())["machine"]["cpu_flags"] == ["avx2"]
    monkeypatch.delenv("UNET_EDGE_CPU_FLAGS")

    # Named by the user, a table of another machine (the target) is used as it is, and never measured into.
    foreign = LatencyTable.open(path, machine_facts(1), given=True)
    assert foreign.foreign
    used, _ = measure_table((SMALL,), foreign, settings, tiny_data)
    assert used.measured == 0 and used.best(SMALL, classes, settings) is not None
    with pytest.raises(SearchError, match=r"has no row for b8-d2-conv-bn-relu-transpose torchscript fp32"):
        measure_table((SMALL, LARGE), foreign, settings, tiny_data)


@pytest.mark.slow
def test_architectures_exported_in_worker_processes_are_the_ones_exported_here(tiny_data, tmp_path):
    """The table exports a batch of architectures side by side in worker processes, then times each alone: the
    files are those an export in this process writes (same random weights, same outputs), and every row lands."""
    from unet_edge.backends import open_backend
    from unet_edge.formats import Precision
    from unet_edge.search.latency import _classes, _Exporters

    classes, ignore_index = _classes(tiny_data)
    settings = replace(SETTINGS, threads=1)
    missing = {arch: {("torchscript", Precision.FP32)} for arch in (SMALL, LARGE)}
    batch = [SMALL, LARGE]
    exported = {}
    for folder, jobs in (("here", 1), ("workers", 2)):
        with _Exporters(jobs, settings, classes, ignore_index, tiny_data, tmp_path / folder) as exporters:
            exported[folder] = exporters.export(missing)
            assert (exporters.pool is not None) == (jobs > 1)  # the workers did the exports and are kept
    here, workers = exported["here"], exported["workers"]
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    for arch in batch:
        (key, path), (other_key, other_path) = *here[arch][0].items(), *workers[arch][0].items()
        assert key == other_key == ("torchscript", "fp32") and here[arch][1] == workers[arch][1] == {}
        assert tmp_path / "workers" in other_path.parents
        outputs = [open_backend(p).predict_logits(x) for p in (path, other_path)]
        np.testing.assert_array_equal(*outputs)

    table, classes_count = measure_table(
        (SMALL, LARGE), LatencyTable.open(tmp_path / "table.json", machine_facts(1), given=False), settings, tiny_data,
        jobs=2,
    )  # fmt: skip
    assert table.measured == 2
    assert all(table.best(arch, classes_count, settings)["latency_ms"]["p50"] > 0 for arch in batch)


def test_deploy_reads_the_scale_of_a_table_measured_here_and_refuses_any_other(
    tiny_data, tmp_path, cli, one_line_error, monkeypatch
):
    """`deploy --latency-table`: this machine's table gives its reference anchor; a missing file, a table with no
    anchored row at the deploy size, or one measured on another machine is a one-line error before any export."""
    deploy = [
        "deploy",
        str(tmp_path / "best.pt"),
        "--threads",
        "1",
        "--image-size",
        "32",
        "--out",
        str(tmp_path / "out"),
    ]
    one_line_error(cli(*deploy, "--latency-table", str(tmp_path / "none.json")), "no such latency table")
    path = write_table(tmp_path, tiny_data, {SMALL: 1.5})  # rows timed without the anchor
    one_line_error(cli(*deploy, "--latency-table", str(path)), "no row timed with the anchor at 32x32 batch 1")
    table = LatencyTable.open(path, machine_facts(1), given=False)
    for key, row in table.rows.items():
        table.rows[key] = {**row, "anchor_ms": 0.8}
    table.save()
    assert table_anchor(path, 1, (32, 32), 1) == pytest.approx(0.8)
    monkeypatch.setenv("UNET_EDGE_CPU_FLAGS", "avx2")  # another CPU kind: the table is another machine's
    one_line_error(cli(*deploy, "--latency-table", str(path)), "measured on another machine")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_budget_nothing_meets_is_a_one_line_error(tiny_data, tmp_path, cli, one_line_error):
    write_table(tmp_path, tiny_data, {SMALL: 1.5, LARGE: 3.0})
    args = ["search", "--data", str(tiny_data), "--runs", str(tmp_path), *SPACE, "--epochs", "1"]
    line = one_line_error(cli(*args, "--max-latency-ms", "1.0"), "no architecture meets the budget of 1.000 ms")
    assert "the fastest is b4-d2-conv-bn-relu-transpose at 1.500 ms (torchscript fp32)" in line
    assert not (tmp_path / "search" / "search").exists()  # nothing trained, no study
    one_line_error(cli(*args, "--max-latency-ratio", "0.5"), "--max-latency-ratio", "give --teacher")


def test_a_storage_that_cannot_be_opened_is_a_one_line_error_before_the_latency_table(
    tiny_data, tmp_path, cli, one_line_error
):
    """A wrong --storage is found at once, not after the table's minutes of timing; its password is not printed."""
    from unet_edge.search.study import shown_url

    missing = tmp_path / "no-such-folder" / "study.db"
    args = ["search", "--data", str(tiny_data), "--runs", str(tmp_path), *SPACE, "--epochs", "1"]
    line = one_line_error(cli(*args, "--storage", f"sqlite:///{missing}"), f"--storage sqlite:///{missing}")
    assert "cannot open the study (OperationalError: " in line and "unable to open database file" in line
    assert not (tmp_path / "search").exists()  # no latency table measured, nothing written
    assert shown_url("postgresql+psycopg://me:secret@db.example/x") == "postgresql+psycopg://me:***@db.example/x"
    assert shown_url("not a url") == "not a url"


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study_within_the_budget_and_deploy_the_front(tiny_data, tmp_path, cli):
    # The table's anchor took 0.01 ms: deploy reads its figures on that scale (far below what it times here).
    write_table(tmp_path, tiny_data, {SMALL: 1.5, LARGE: 3.0}, anchor_ms=0.01)
    result = cli(
        "search", "--data", str(tiny_data), "--runs", str(tmp_path), *SPACE, "--epochs", "1", "--trials", "4",
        "--workers", "2", "--max-latency-ms", "2", "--deploy-seconds", "0.05", "--name", "duo",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    folder = tmp_path / "search" / "duo"
    trials = trained(load_trials(f"sqlite:///{folder / 'study.db'}", "duo"))
    assert len(trials) == 4
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes trained trials
    assert {t.params["architecture"] for t in trials} == {SMALL.name}  # the larger one is over the budget
    check_trained_once(trials, epochs=1)

    report = json.loads((folder / "search.json").read_text())
    assert report["budget_ms"] == 2.0
    assert [a["feasible"] for a in report["architectures"]] == [True, False]
    best = max(t.value for t in trials if t.state.name == "COMPLETE")
    assert report["front"] and report["front"][0]["val_miou"] == pytest.approx(best)
    winner = report["deploy"]["winner"]
    assert winner["format"] == "torchscript" and winner["latency_ms"]["p50"] > 0 and winner["val_miou"] is not None
    assert all(Path(f).is_file() for f in winner["files"])
    assert (folder / "search.png").stat().st_size > 0
    assert "to ship" in result.stdout and "on the latency table's scale" in result.stdout
    deployed = json.loads((folder / "deploy" / "deploy.json").read_text())
    assert deployed["settings"]["anchor_ms"] == 0.01  # the table's reference, handed to deploy
    baseline = deployed["baseline"]
    assert report["deploy"]["anchor_scale"] == pytest.approx(baseline["scale"])
    assert baseline["scale"] == pytest.approx(0.01 / baseline["anchor_p50_ms"]) and baseline["scale"] < 1


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes(tiny_data, tiny_checkpoint, tmp_path, cli):
    """With a teacher: its eager latency is timed once (the budget is a ratio of it) and trials may distil."""
    write_table(tmp_path, tiny_data, {SMALL: 1.5, LARGE: 3.0})
    folder = tmp_path / "search" / "search"
    storage = f"sqlite:///{folder / 'study.db'}"
    command = [
        sys.executable, "-m", "unet_edge_cli.main", "search", "--data", str(tiny_data), "--runs", str(tmp_path),
        *SPACE, "--epochs", "2", "--trials", "2", "--no-deploy", "--teacher", str(tiny_checkpoint),
        "--max-latency-ratio", "1000",
    ]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    second = folder / "trials" / "001"  # one worker: trial 1 starts training once trial 0 has finished
    deadline = time.time() + 180
    try:
        while time.time() < deadline and process.poll() is None and not second.is_dir():
            time.sleep(0.02)  # a file check, not a study load: a tiny trial trains for only a second or two
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert second.is_dir(), process.stderr.read().decode() if process.stderr else ""
    states = {t.number: t.state.name for t in load_trials(storage, "search")}
    assert states == {0: "COMPLETE", 1: "RUNNING"}, states  # killed while trial 1 trained
    killed = 1
    before = {t.number: t.value for t in load_trials(storage, "search") if t.state.name == "COMPLETE"}

    result = cli(*command[3:])  # the same command again
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load_trials(storage, "search")
    by_number = {t.number: t for t in trials}
    assert all(by_number[n].state.name == "COMPLETE" and by_number[n].value == v for n, v in before.items())
    assert by_number[killed].state.name == "FAIL"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].params == by_number[killed].params
    assert retried[0].state.name in ("COMPLETE", "PRUNED")
    assert len(trained(trials)) == 2
    check_trained_once(trained(trials), epochs=2)

    from unet_edge.checkpoint import load_checkpoint

    for trial in trained(trials):  # a distilled trial's run records its teacher, as `unet-edge train` does
        state = load_checkpoint(Path(trial.user_attrs["run_dir"]) / "last.pt")
        assert ("teacher" in state) == trial.params["distill"]
    report = json.loads((folder / "search.json").read_text())
    assert report["teacher_eager_p50_ms"] > 0
    assert report["budget_ms"] == pytest.approx(1000 * report["teacher_eager_p50_ms"])
    assert sum(key.startswith("teacher:") for key in json.loads(table_path(tmp_path).read_text())["rows"]) == 1


@pytest.mark.slow
def test_timeout_stops_the_study_and_the_trial_it_caught_keeps_its_epochs(tiny_data, tmp_path, cli):
    """--timeout is a hard limit: the trial training at the deadline is stopped after its current epoch (pruned,
    its run folder kept), no new trial starts, and the command still writes the report. Without it, 500 trials of
    500 epochs would not end."""
    write_table(tmp_path, tiny_data, {SMALL: 1.5, LARGE: 3.0})
    started = time.monotonic()
    result = cli(
        "search", "--data", str(tiny_data), "--runs", str(tmp_path), *SPACE, "--epochs", "500", "--trials", "500",
        "--timeout", "8", "--no-deploy", "--name", "brief",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 300  # far from 500 x 500 epochs
    folder = tmp_path / "search" / "brief"
    trials = load_trials(f"sqlite:///{folder / 'study.db'}", "brief")
    assert 1 <= len(trials) < 500
    stopped = [t for t in trials if t.user_attrs.get("stopped") == "--timeout"]
    assert len(stopped) == 1 and stopped[0].state.name == "PRUNED"
    epochs = len((Path(stopped[0].user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines())
    assert 1 <= epochs < 500 and epochs == len(stopped[0].intermediate_values)
    report = json.loads((folder / "search.json").read_text())
    assert len(report["trials"]) == len(trials)
    assert "stopped by --timeout" in json.dumps(report["trials"])


def postgres_url() -> str:
    """The server `make test-tools` starts, or UNET_EDGE_TEST_POSTGRES; the test skips (fails under CI=true) when
    none answers."""
    url = os.environ.get("UNET_EDGE_TEST_POSTGRES", "postgresql+psycopg://unet_edge:unet_edge@127.0.0.1:5432/unet_edge")
    try:
        import psycopg

        psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3).close()
    except Exception as exc:
        reason = f"no PostgreSQL server at {url} ({exc.__class__.__name__}; `make test-tools` starts one)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return url


@pytest.mark.slow
def test_two_workers_on_a_postgresql_study(tiny_data, tmp_path, cli):
    url = postgres_url()
    write_table(tmp_path, tiny_data, {SMALL: 1.5, LARGE: 3.0})
    name = f"test-{uuid.uuid4().hex[:12]}"
    result = cli(
        "search", "--data", str(tiny_data), "--runs", str(tmp_path), *SPACE, "--epochs", "1", "--trials", "3",
        "--workers", "2", "--storage", url, "--name", name, "--no-deploy",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    trials = trained(load_trials(url, name))
    assert len(trials) == 3
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    check_trained_once(trials, epochs=1)
    assert not (tmp_path / "search" / name / "study.db").exists()  # the study lives on the server
    report = json.loads((tmp_path / "search" / name / "search.json").read_text())
    assert len(report["trials"]) == 3
    from unet_edge.search.study import shown_url

    assert report["study"]["storage"] == shown_url(url)  # its password, if any, hidden


def test_the_space_names_each_architecture_once():
    from unet_edge.search.space import architectures

    space = architectures((8, 4, 8), (3,), ("conv-bn-relu", "conv-relu-bn"), ("bilinear",))
    assert [a.name for a in space] == [
        "b4-d3-conv-bn-relu-bilinear",
        "b4-d3-conv-relu-bn-bilinear",
        "b8-d3-conv-bn-relu-bilinear",
        "b8-d3-conv-relu-bn-bilinear",
    ]
    assert space[0].model_config(5).to_dict()["num_classes"] == 5
    with pytest.raises(ValueError, match="empty"):
        architectures((), (3,))


def test_a_table_from_another_machine_is_read_not_measured(tiny_data, tmp_path, cli, one_line_error):
    path = write_table(tmp_path, tiny_data, {SMALL: 1.5})
    data = json.loads(path.read_text())
    data["machine"]["cpu"] = "Target Board"
    data["machine_key"] = "another machine"
    path.write_text(json.dumps(data))
    args = ["search", "--data", str(tiny_data), "--runs", str(tmp_path), *SPACE, "--latency-table", str(path)]
    result = cli(*args, "--base-channels", "4", "--latency-only")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "measured on Target Board" in result.stdout and "b4-d2-conv-bn-relu-transpose: 1.500 ms" in result.stdout
    line = one_line_error(cli(*args, "--latency-only"), "measured on Target Board, it has no row for b8-d2")
    assert "--latency-only" in line
    assert json.loads(path.read_text())["machine_key"] == "another machine"  # never rewritten


def test_trials_train_for_the_epochs_train_would_run_on_the_set_unless_told(tiny_data):
    """Without --epochs a trial is trained as `unet-edge train` trains on that training set (24 images here: the
    schedule's most epochs), so the front is not a ranking of runs cut short at different points of their climb."""
    from unet_edge.config import schedule_epochs
    from unet_edge.search import SearchOptions, _schedule_epochs

    assert SearchOptions().epochs is None
    assert _schedule_epochs(tiny_data, 16) == schedule_epochs(24) == 200


def test_every_trial_trains_as_long_as_trains_own_run_of_the_start_architecture(tiny_data, tmp_path, monkeypatch):
    """On 240 training images `train` runs 60 epochs at base 16 and 120 at base 8: a study whose start trial is base
    8 trains every trial 120 epochs (so that trial is `train`'s own run), one starting at base 16 60; --epochs wins."""
    from unet_edge.search import SearchOptions, _spec

    class Train240:
        def __init__(self, root, split):
            pass

        def __len__(self):
            return 240

    monkeypatch.setattr("unet_edge.data.ImageSegmentation", Train240)
    b8, b16 = Architecture(8, 3), Architecture(16, 3)
    best = {a.name: table_row(a, 4, p50) for a, p50 in ((b8, 3.0), (b16, 9.0))}
    options = SearchOptions(data=tiny_data, runs_dir=tmp_path)
    assert _spec(options, (b8,), best, tiny_data, 1, 0.0).epochs == 120
    assert _spec(options, (b8, b16), best, tiny_data, 1, 0.0).epochs == 60
    assert _spec(replace(options, epochs=7), (b8,), best, tiny_data, 1, 0.0).epochs == 7


def test_the_pruner_leaves_a_trial_alone_until_the_middle_of_its_epochs():
    """A small student may sit on the background plateau for a third of its schedule, then climb: below the
    median at its first epochs is not hopeless. From the middle epoch on (the 5th of 10), the median pruner decides."""
    import optuna

    from unet_edge.search.study import pruner

    study = optuna.create_study(direction="maximize", pruner=pruner(epochs=10))
    for _ in range(4):  # the startup trials, which climbed early
        trial = study.ask()
        for epoch in range(1, 11):
            trial.report(0.9, epoch)
        study.tell(trial, 0.9)
    late = study.ask()
    verdicts = []
    for epoch in range(1, 11):
        late.report(0.05, epoch)  # still on the plateau
        verdicts.append(late.should_prune())
    assert verdicts == [False] * 4 + [True] * 6, verdicts


def test_the_start_is_trains_default_model_narrowed_to_the_budget_not_the_slowest():
    """A wide shallow model or a bilinear one may be slower than train's own kind of model without being more
    capable: the start keeps train's depth where a model of it fits, the widest, and its up-sampling between equals."""
    from unet_edge.search.study import start_architecture

    order = "conv-relu-bn"
    shallow, bilinear = Architecture(12, 2, order, "transpose"), Architecture(8, 3, order, "bilinear")
    trains_kind, narrow = Architecture(8, 3, order, "transpose"), Architecture(4, 3, order, "transpose")
    latency = {shallow.name: 5.0, bilinear.name: 4.5, trains_kind.name: 4.0, narrow.name: 2.0}
    assert start_architecture((narrow, shallow, trains_kind, bilinear), latency) == trains_kind
    assert start_architecture((narrow, shallow, bilinear), latency) == bilinear  # train's depth, then the width
    other = Architecture(8, 2, order, "transpose")
    latency[other.name] = 3.0
    assert start_architecture((other, shallow), latency) == shallow  # none of train's depth: the widest


def test_a_new_study_starts_from_trains_defaults_on_the_largest_model_within_the_budget(tmp_path):
    """The first trials are what `unet-edge train` would run on its default model narrowed to fit (distilled with
    the default weight, and alone), so the search cannot end below them; a resumed study queues nothing again."""
    import optuna

    from unet_edge.config import width_lr
    from unet_edge.search.study import StudySpec, default_trials, enqueue_defaults

    small, large = Architecture(4, 2), Architecture(8, 3)
    spec = StudySpec(
        storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s", architectures=(small, large),
        latency_ms={small.name: 1.0, large.name: 2.0}, trials=4, deadline=None, trials_dir=str(tmp_path),
        data="", teacher="teacher.pt", epochs=2, batch_size=8, image_size=32, lr_range=(3e-4, 1e-2),
        distill_weight_range=(0.02, 1.0), seed=0, device="cpu", threads=1, heartbeat_s=20,
    )  # fmt: skip
    lr = width_lr(8)
    assert default_trials(spec) == [
        {"architecture": large.name, "lr": lr, "distill": True, "distill_weight": 1.0},
        {"architecture": large.name, "lr": lr, "distill": False},
    ]
    assert default_trials(replace(spec, teacher=None)) == [{"architecture": large.name, "lr": lr}]
    study = optuna.create_study(direction="maximize")
    enqueue_defaults(study, spec)
    enqueue_defaults(study, spec)  # the study has trials now: nothing more
    assert [t.system_attrs["fixed_params"] for t in study.get_trials()] == default_trials(spec)
    assert all(t.state.name == "WAITING" for t in study.get_trials())


# Each process opens the study through the storage search builds, says it is ready (a file), waits for the other
# one, and asks for queued trials from then on.
POP_QUEUED = """
import json, pathlib, sys, time
import optuna
from unet_edge.search.study import StudySpec, open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
spec = StudySpec(**json.loads(sys.argv[1]))
study = optuna.load_study(study_name=spec.study_name, storage=open_storage(spec.storage, spec.heartbeat_s))
ready = pathlib.Path(sys.argv[2])
(ready / sys.argv[4]).touch()
while len(list(ready.iterdir())) < 2:
    time.sleep(0.001)
print(json.dumps([study.ask().number for _ in range(int(sys.argv[3]))]))
"""


def test_two_workers_never_take_the_same_queued_trial_of_a_sqlite_study(tmp_path):
    """Optuna hands a queued trial to one worker by reading it WAITING and writing it RUNNING; on SQLite those
    were two steps, and two workers starting together both took the first queued trial (then one of them
    failed: "Cannot tell a COMPLETE trial"). Here two processes ask for 20 queued trials each at once."""
    import optuna

    from unet_edge.search.study import StudySpec, open_storage

    spec = StudySpec(
        storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="queue", architectures=(), latency_ms={},
        trials=40, deadline=None, trials_dir=str(tmp_path), data="", teacher=None, epochs=1, batch_size=8,
        image_size=32, lr_range=(3e-4, 1e-2), distill_weight_range=(0.02, 1.0), seed=0, device="cpu", threads=1,
        heartbeat_s=20,
    )  # fmt: skip
    study = optuna.create_study(storage=open_storage(spec.storage, spec.heartbeat_s), study_name=spec.study_name)
    for x in range(40):
        study.enqueue_trial({"x": x}, skip_if_exists=False)
    ready = tmp_path / "ready"
    ready.mkdir()
    argv = [json.dumps({**spec.to_json(), "architectures": []}), str(ready), "20"]
    workers = [
        subprocess.Popen([sys.executable, "-c", POP_QUEUED, *argv, str(i)], stdout=subprocess.PIPE) for i in (0, 1)
    ]
    taken = [json.loads(worker.communicate(timeout=120)[0]) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    assert sorted(taken[0] + taken[1]) == list(range(40)), taken  # each queued trial went to one worker
