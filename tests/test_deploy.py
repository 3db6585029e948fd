"""`unet-edge deploy`: the decision over measured records (no timing asserted), the resumable cache, and a
tiny end-to-end run over two checkpoints and two formats whose winner loads and segments like its checkpoint."""

import itertools
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from unet_edge.deploy import (
    Candidate,
    DeployError,
    DeployOptions,
    DeployResult,
    Machine,
    Reference,
    Settings,
    decide,
    pareto_front,
    plan_candidates,
    run_deploy,
)
from unet_edge.formats import FORMATS, Precision, Provider, export_formats

REPO = Path(__file__).resolve().parents[1]


def candidate(
    name: str, p50: float | None, miou: float | None, drop: float | None, rejected: str | None = None, mb: float = 1.0
) -> Candidate:
    return Candidate(
        model=name,
        checkpoint=f"runs/{name}/best.pt",
        checkpoint_sha256=name * 8,
        format="onnx",
        precision="fp32",
        path=f"{name}.onnx",
        size_mb=mb,
        miou=miou,
        miou_drop=drop,
        latency_ms=None if p50 is None else {"p50": p50, "p90": p50, "p99": p50, "mean": p50, "min": p50},
        rejected=rejected,
        key=name,
    )


def test_winner_is_the_lowest_p50_within_the_budget():
    rows = [
        candidate("slow", 9.0, 0.90, 0.0),
        candidate("fast-over", None, 0.85, 0.05),  # the budget's verdict is decide's: no field says it
        candidate("fastest-failed", 1.0, 0.90, 0.0, rejected="timing failed: RuntimeError: boom"),
        candidate("edge", 4.0, 0.89, 0.01),  # exactly at the budget: passes
        candidate("mid", 6.0, 0.895, 0.005),
        candidate("just-over", 2.0, 0.8899, 0.0101),
    ]
    decision = decide(rows, 0.01)
    assert decision.winner is not None and decision.winner.key == "edge"
    assert decision.require_winner() is decision.winner
    assert [c.key for c in decision.ranked[:5]] == ["fastest-failed", "just-over", "edge", "mid", "slow"]
    assert decision.ranked[-1].key == "fast-over"  # untimed rows follow, every candidate keeps its row
    reasons = {v.candidate.key: v.reason for v in decision.verdicts}
    assert reasons["fast-over"] == "over budget: val mIoU drop 0.0500 > 0.0100"
    assert reasons["fastest-failed"] == "timing failed: RuntimeError: boom" and reasons["edge"] is None
    assert decide(rows, 0.02).winner.key == "just-over"
    assert decide(rows, 0.0).winner.key == "slow"


def test_with_a_latency_budget_the_winner_is_the_most_accurate_within_both_budgets():
    rows = [
        candidate("accurate-slow", 9.0, 0.90, 0.0),
        candidate("accurate-fit", 4.0, 0.895, 0.005),
        candidate("fastest", 2.0, 0.85, 0.05),
        candidate("fit-tie", 4.5, 0.895, 0.005),
    ]
    decision = decide(rows, 1.0, max_latency_ms=5.0)
    assert decision.winner.key == "accurate-fit"  # not the fastest; the tie on mIoU goes to the lower p50
    reasons = {v.candidate.key: v.reason for v in decision.verdicts}
    assert reasons["accurate-slow"] == "over the latency budget: p50 9.000 ms > 5.000 ms"
    assert decide(rows, 1.0).winner.key == "fastest"  # without one, the fastest within the mIoU budget
    assert decide(rows, 0.004, max_latency_ms=5.0).winner is None  # the mIoU budget still holds
    none_fits = decide(rows, 0.01, max_latency_ms=1.0)
    assert none_fits.winner is None and none_fits.closest.key == "accurate-fit"  # the fastest within the mIoU budget
    with pytest.raises(DeployError, match=r"no candidate within the accuracy budget runs in 1.000 ms; the fastest"):
        none_fits.require_winner()


def test_ties_on_p50_go_to_the_more_accurate_then_the_smaller_file():
    rows = [
        candidate("a", 5.0, 0.80, 0.0, mb=1.0),
        candidate("b", 5.0, 0.81, 0.0, mb=2.0),
        candidate("c", 5.0, 0.81, 0.0, mb=0.5),
    ]
    assert decide(rows, 0.01).winner.key == "c"


def test_pareto_front_keeps_only_points_nothing_beats_on_both_axes():
    rows = [
        candidate("p1", 1.0, 0.80, 0.10),
        candidate("p2", 2.0, 0.85, 0.05),
        candidate("dominated-by-p2", 3.0, 0.84, 0.06),
        candidate("same-speed-worse", 2.0, 0.80, 0.10),
        candidate("p4", 4.0, 0.90, 0.0),
        candidate("untimed", None, 0.95, -0.05),
    ]
    assert [c.key for c in pareto_front(rows)] == ["p1", "p2", "p4"]
    # decide draws the front over the candidates within the budget only
    assert [c.key for c in decide(rows, 0.06).front] == ["p2", "p4"]


def test_nothing_within_the_budget_refuses_naming_the_closest():
    rows = [
        candidate("far", None, 0.70, 0.20),
        candidate("near", None, 0.88, 0.0234),
        candidate("broken", None, None, None, rejected="export failed: ArtifactError: no converter"),
    ]
    decision = decide(rows, 0.01)
    assert decision.winner is None and decision.front == () and decision.closest.key == "near"
    with pytest.raises(DeployError, match=r"near onnx fp32, drops val mIoU by 0\.0234 \(budget 0\.0100\)"):
        decision.require_winner()
    with pytest.raises(DeployError, match="no candidate could be exported and measured"):
        decide([rows[2]], 0.01).require_winner()


def test_cli_exits_1_with_one_line_when_nothing_passes(monkeypatch, tmp_path, cli, one_line_error):
    rows = [candidate("near", None, 0.88, 0.0234)]
    result = DeployResult(
        rows,
        decide(rows, 0.01),
        Reference("runs/ref/best.pt", "ab" * 32, "ref", "base 8, depth 2", 0.9034, "highest val mIoU"),
        None,
        (),
        Machine("test CPU"),
        Settings(("runs/ref/best.pt",), 0.01, None, (256, 256), 1, 2, 2.0, 30, 3, 3),
        tmp_path,
        tmp_path / "deploy.json",
    )
    monkeypatch.setattr("unet_edge.deploy.run_deploy", lambda options, progress=None: result)
    outcome = cli("deploy", "--out", str(tmp_path))
    one_line_error(outcome, "near.onnx", "near onnx fp32", "0.0234")
    assert "over budget" in outcome.stdout  # the table is printed before the refusal


def test_bf16_and_fp16_only_where_the_cpu_computes_them(monkeypatch):
    if FORMATS["openvino"].unavailable(Provider.CPU) or FORMATS["onnx"].unavailable(Provider.CPU):
        pytest.skip("needs the openvino extra")
    monkeypatch.setenv("UNET_EDGE_CPU_FLAGS", "avx2 fma")
    plan = plan_candidates(("onnx", "openvino", "torchscript"), None)
    assert dict(plan.formats) == {
        "onnx": (Precision.FP32, Precision.INT8),
        "openvino": (Precision.FP32, Precision.INT8),
        "torchscript": (Precision.FP32,),
    }
    reasons = {(s.format, s.precision): s.reason for s in plan.skipped}
    assert set(reasons) == {("onnx", "fp16"), ("openvino", "bf16")}
    assert "avx512_bf16" in reasons[("openvino", "bf16")] and "avx512_fp16" in reasons[("onnx", "fp16")]
    monkeypatch.setenv("UNET_EDGE_CPU_FLAGS", "avx2 avx512_bf16")
    plan = plan_candidates(("openvino",), (Precision.BF16,))
    assert plan.formats == (("openvino", (Precision.BF16,)),) and plan.skipped == ()


def test_each_format_maps_the_deploy_target_onto_options_it_declares():
    from unet_edge.formats import DeployTarget

    target = DeployTarget(image_size=(64, 48), batch_size=2, max_side=96, calibration="entropy")
    mapped = {name: fmt.options_for(target) for name, fmt in export_formats().items()}
    assert mapped["executorch"] == {"max_batch": 2, "max_size": 96}
    assert mapped["litert"] == {"image_size": (64, 48)}
    assert mapped["onnx"] == {"calib_method": "entropy"} and mapped["torchscript"] == {}
    for name, options in mapped.items():  # a format maps the target onto its own options only
        assert set(options) <= {option.name for option in export_formats()[name].options}, name
    assert FORMATS["onnx"].options_for(DeployTarget((64, 64))) == {}  # no calibration asked: the format's default


def test_the_longest_exports_start_first_and_the_larger_model_first_among_equals():
    """Workers take the jobs in this order: the slow conversions (AOTInductor, XNNPACK) first, so a short one is
    what runs alone at the end; a format's cost counts its precisions."""
    from unet_edge.deploy import _export_cost, measure
    from unet_edge.formats import DeployTarget
    from unet_edge.model import UNetStudent

    def job(fmt: str, precisions: tuple[Precision, ...], base: int) -> measure.ExportJob:
        model = UNetStudent(base_channels=base, depth=2)
        loaded = type("Loaded", (), {"model": model})()
        checkpoint = measure.Checkpoint(Path(f"b{base}.pt"), str(base), f"b{base}", "", loaded)
        return measure.ExportJob(checkpoint, fmt, precisions, 0.01, DeployTarget((64, 64)))

    fp32, int8 = (Precision.FP32,), (Precision.FP32, Precision.INT8)
    jobs = [
        job("torchscript", fp32, 8),
        job("onnx", int8, 8),
        job("pt2", int8, 4),
        job("pt2", int8, 8),
        job("onnx", fp32, 8),
        job("executorch", int8, 8),
    ]
    order = [(j.format, j.precisions, j.checkpoint.name) for j in sorted(jobs, key=_export_cost, reverse=True)]
    assert order[:3] == [("pt2", int8, "b8"), ("pt2", int8, "b4"), ("executorch", int8, "b8")]
    assert order[3:] == [("onnx", int8, "b8"), ("onnx", fp32, "b8"), ("torchscript", fp32, "b8")]


def test_what_the_first_round_shows_cannot_win_leaves_the_race():
    from unet_edge.deploy.timing import contenders

    samples = {
        "leader": [1.0, 1.1, 1.2, 1.0],
        "close": [1.1, 1.2, 1.3, 1.2],
        "slow": [3.0, 3.1, 2.9, 3.2],
        "untimed": [],
    }
    assert contenders(samples) == {"leader", "close"}
    # with a latency budget the most accurate within it wins, not the fastest: all that may run within it race on
    assert contenders(samples, max_latency_ms=3.0) == {"leader", "close", "slow"}
    assert contenders(samples, max_latency_ms=1.5) == {"leader", "close"}


def test_the_first_round_screens_and_the_contenders_get_the_rest_of_the_seconds():
    from unet_edge.deploy import DeployOptions
    from unet_edge.deploy.timing import SCREEN_SHARE, round_seconds

    options = DeployOptions(checkpoints=(), seconds=2.0, rounds=3)
    contender = [round_seconds(options, done, baseline=False) for done in range(3)]
    assert contender[0] == pytest.approx(2.0 * SCREEN_SHARE) and contender[0] < contender[1] == contender[2]
    assert sum(contender) == pytest.approx(2.0)  # a contender is timed for `seconds` in all
    assert [round_seconds(options, done, baseline=True) for done in range(3)] == [pytest.approx(2.0 / 3)] * 3
    assert round_seconds(replace(options, rounds=1), 0, baseline=False) == 2.0  # one round: nothing to screen for


class _FakeBackend:
    """A backend whose runners are tagged with the figures the fake clock gives them."""

    def __init__(self, model_ms: float, app_ms: float) -> None:
        self.model_ms, self.app_ms = model_ms, app_ms

    def device_runner(self, images):
        return _tagged(self.model_ms)

    def segment(self, images):
        return None

    def close(self) -> None:
        pass


def _tagged(ms: float):
    def run() -> None:
        pass

    run.ms = ms
    return run


@pytest.mark.parametrize("anchor_ms", [None, 1.0])
def test_with_a_reference_anchor_every_figure_is_read_on_the_tables_scale(anchor_ms, monkeypatch):
    """The machine runs at half the speed it had when the latency table was measured: the anchor takes 2 ms here
    against the table's 1 ms. Handed that reference, deploy times the anchor with the candidates and reads every
    figure, the baseline's too, at half: 4 ms becomes 2 ms and 5.9 ms 2.95 ms, both within a 3 ms budget the
    table's own figures were read against, and the slower, more accurate one stays in the race after the first
    round and wins. Without a reference the anchor is not timed, the figures stay as timed and both are over."""
    from unet_edge.deploy.cache import DeployCache
    from unet_edge.deploy.measure import Checkpoint
    from unet_edge.deploy.timing import time_candidates

    backends = {n: _FakeBackend(m, a) for n, m, a in (("ref.pt", 20, 22), ("fast.onnx", 4, 5), ("slow.onnx", 5.9, 7))}
    monkeypatch.setattr("unet_edge.backends.open_backend", lambda path, provider, threads: backends[Path(path).name])
    monkeypatch.setattr("unet_edge.bench.anchor.anchor_runner", lambda image_size, batch_size: _tagged(2.0))
    timed_runners = []

    def ms(run) -> float:  # a model runner is tagged; the app column is a partial of the backend's segment
        return run.ms if hasattr(run, "ms") else run.func.__self__.app_ms

    def clock(runners, **kwargs):
        timed_runners.extend(runners)
        return [[ms(run)] * 10 for run in runners]

    monkeypatch.setattr("unet_edge.bench.time_interleaved", clock)
    reference = Checkpoint(Path("ref.pt"), "ab" * 32, "ref", "b8-d3", loaded=None)
    options = DeployOptions(max_latency_ms=3.0, anchor_ms=anchor_ms, rounds=2, image_size=(32, 32))
    entrants = [
        replace(candidate("fast", None, 0.90, 0.02), path="fast.onnx"),
        replace(candidate("slow", None, 0.92, 0.0), path="slow.onnx"),
    ]
    [fast, slow], baseline = time_candidates(entrants, reference, options, 1, DeployCache(None), lambda *_: None)
    scale = 1.0 if anchor_ms is None else 0.5
    assert fast.p50 == pytest.approx(4.0 * scale) and fast.app_latency_ms["p50"] == pytest.approx(5.0 * scale)
    assert slow.p50 == pytest.approx(5.9 * scale)
    assert baseline.p50 == pytest.approx(20.0 * scale) and baseline.scale == pytest.approx(scale)
    anchor_calls = [run for run in timed_runners if ms(run) == 2.0]
    assert len(anchor_calls) == (0 if anchor_ms is None else 2)  # in every round, or not at all
    assert baseline.anchor_p50_ms == (None if anchor_ms is None else pytest.approx(2.0))
    # the screen compares what it timed with the budget as timed (3 ms / 0.5): 5.9 ms may win, so it is timed again
    assert slow.calls == (10 if anchor_ms is None else 20)
    winner = decide([fast, slow], 0.05, options.max_latency_ms).winner
    assert winner == (None if anchor_ms is None else slow)


def test_readme_holds_each_embedding_snippet_deploy_writes():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name, fmt in export_formats().items():
        snippet = fmt.embedding
        assert snippet is not None, name
        assert f"{snippet.intro}:\n\n```python\n{snippet.code}```" in readme, name


@pytest.fixture(scope="module")
def deployed(tiny_checkpoint, other_checkpoint, tmp_path_factory, cli):
    """Two checkpoints x (onnx, torchscript) fp32, deployed at 48x48: first stopped by Ctrl-C after the first
    checkpoint's two formats were measured, then the same deploy from the command line, counting the
    exports and measurements the second run does."""
    import unet_edge.deploy.measure
    import unet_edge.export

    other = other_checkpoint
    out = tmp_path_factory.mktemp("deployed")
    options = DeployOptions(
        checkpoints=(tiny_checkpoint, other),
        formats=("onnx", "torchscript"),
        precisions=(Precision.FP32,),
        image_size=(48, 48),
        seconds=0.05,
        min_calls=6,
        out=out,
        threads=1,
        jobs=1,  # in this process: the counting below patches this process's functions
        max_miou_drop=1.0,  # both checkpoints compete (one over the budget would not be exported)
    )
    names = {tiny_checkpoint: tiny_checkpoint.parent.name, other: other.parent.name}

    def ctrl_c(done, total, status):
        if status.startswith(f"exporting {names[other]}"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_deploy(options, ctrl_c)
    calls = {"export": [], "measure": []}
    with pytest.MonkeyPatch.context() as patch:
        real_export, real_measure = unet_edge.export.run_export, unet_edge.deploy.measure.measure_accuracy
        patch.setattr(
            unet_edge.export,
            "run_export",
            lambda opts, *a, **k: calls["export"].append(opts) or real_export(opts, *a, **k),
        )
        patch.setattr(
            unet_edge.deploy.measure,
            "measure_accuracy",
            lambda c, *a: calls["measure"].append(c.label) or real_measure(c, *a),
        )
        result = cli(
            "deploy",
            str(tiny_checkpoint),
            str(other),
            "--format",
            "onnx,torchscript",
            "--precision",
            "fp32",
            "--image-size",
            "48",
            "--seconds",
            "0.05",
            "--min-calls",
            "6",
            "--threads",
            "1",
            "--jobs",
            "1",
            "--max-miou-drop",
            "1",
            "--out",
            str(out),
        )
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        "out": out,
        "stdout": result.stdout,
        "calls": calls,
        "checkpoints": (tiny_checkpoint, other),
        "names": names,
    }


@pytest.mark.slow
def test_a_checkpoint_already_over_the_budget_is_not_exported(tiny_checkpoint, other_checkpoint, tmp_path):
    import unet_edge.export

    exported = []
    real_export = unet_edge.export.run_export
    options = DeployOptions(
        checkpoints=(tiny_checkpoint, other_checkpoint),
        reference=tiny_checkpoint,
        formats=("torchscript",),
        precisions=(Precision.FP32,),
        image_size=(48, 48),
        seconds=0.05,
        min_calls=3,
        out=tmp_path / "out",
        threads=1,
        jobs=1,
        max_miou_drop=0.0,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            unet_edge.export, "run_export", lambda o, *a, **k: exported.append(o.checkpoint) or real_export(o, *a, **k)
        )
        result = run_deploy(options)
    mious = {Path(c["path"]): c["miou"] for c in result.reference.checkpoints.values()}
    drop = mious[tiny_checkpoint] - mious[other_checkpoint]
    assert drop > 0.001, mious  # the test's premise: the other checkpoint is less accurate than the reference
    assert exported == [tiny_checkpoint]
    by_model = {c.checkpoint: c for c in result.candidates}
    skipped = by_model[str(other_checkpoint)]
    assert skipped.rejected == (
        f"not exported: its checkpoint's val mIoU {mious[other_checkpoint]:.4f} is {drop:.4f} below the "
        "reference's, over the budget 0.0000"
    )
    assert skipped.path is None and skipped.latency_ms is None
    assert result.decision.winner is not None and result.decision.winner.checkpoint == str(tiny_checkpoint)


@pytest.mark.slow
def test_a_rerun_after_ctrl_c_does_only_what_was_missing(deployed):
    other = deployed["checkpoints"][1]
    assert sorted(opts.formats[0] for opts in deployed["calls"]["export"]) == ["onnx", "torchscript"]
    assert all(opts.checkpoint == other for opts in deployed["calls"]["export"])
    assert sorted(deployed["calls"]["measure"]) == sorted(
        f"{deployed['names'][other]} {f} fp32" for f in ("onnx", "torchscript")
    )


@pytest.mark.slow
def test_deploy_writes_report_plot_and_a_winner_that_segments_like_its_checkpoint(
    deployed, tiny_data, agreement, monkeypatch
):
    from PIL import Image

    from unet_edge.backends import open_backend

    out = deployed["out"]
    report = json.loads((out / "deploy.json").read_text())
    rows = report["candidates"]
    assert len(rows) == 4 and {(r["model"], r["format"]) for r in rows} == {
        (n, f) for n in deployed["names"].values() for f in ("onnx", "torchscript")
    }
    assert report["reference"]["miou"] == max(r["miou"] for r in rows)
    for row in rows:
        assert {"files", "miou", "miou_drop", "pixel_agreement", "latency_ms", "size_mb", "rejected", "pareto"} <= set(
            row
        )
        assert row["files"][0]["sha256"] and row["files"][0]["file"] == row["path"]
        assert row["miou_drop"] == pytest.approx(report["reference"]["miou"] - row["miou"])
        if row["rejected"] is None:
            lat = row["latency_ms"]
            # at least the screening round's share of --min-calls 6 (what cannot win is not timed further)
            assert lat["p50"] <= lat["p90"] <= lat["p99"] and row["calls"] >= 2 and row["app_latency_ms"]["p50"] > 0
        else:
            assert row["rejected"].startswith("over budget") and row["latency_ms"] is None
    winner = next(r for r in rows if r["winner"])
    assert winner["pareto"] and winner["rejected"] is None
    assert winner["latency_ms"]["p50"] == min(r["latency_ms"]["p50"] for r in rows if r["latency_ms"])
    assert winner["calls"] >= 6  # a contender to the end: all of --min-calls
    assert report["baseline"]["runtime"] == "pytorch eager" and report["baseline"]["calls"] >= 6
    assert report["settings"]["threads"] == 1 and report["settings"]["image_size"] == [48, 48]
    assert (out / "deploy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "winner" in deployed["stdout"] and "× eager" in deployed["stdout"]

    model = out / Path(winner["path"]).name
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["file"] for e in manifest["artifacts"]] == [model.name] and manifest["deploy"]["format"] == winner[
        "format"
    ]
    checkpoint = Path(winner["checkpoint"])
    images = np.stack(
        [np.asarray(Image.open(p).convert("RGB")) for p in sorted((tiny_data / "val" / "images").glob("*.png"))]
    )
    masks = open_backend(model).segment(images)  # sha256-checked against OUT/manifest.json
    expected = open_backend(checkpoint).segment(images)
    assert agreement(masks, expected) >= 0.999

    # EMBEDDING.md's snippet runs as written in OUT (with the winner's file name) and gives the same mask
    code = re.search(r"```python\n(.*?)```", (out / "EMBEDDING.md").read_text(), flags=re.S).group(1)
    Image.fromarray(images[0]).save(out / "image.png")
    monkeypatch.chdir(out)
    scope: dict = {}
    threads = torch.get_num_threads()
    try:
        exec(code.replace(f'"{FORMATS[winner["format"]].file}"', f'"{model.name}"'), scope)
    finally:
        torch.set_num_threads(threads)  # the TorchScript snippet sets it for the process
    assert agreement(np.asarray(scope["mask"]), masks[0]) >= 0.999


@pytest.mark.slow
def test_the_same_command_again_exports_measures_and_times_nothing(deployed, monkeypatch, cli):
    def refuse(*args, **kwargs):
        raise AssertionError("finished work done again")

    before = json.loads((deployed["out"] / "deploy.json").read_text())
    monkeypatch.setattr("unet_edge.export.run_export", refuse)
    monkeypatch.setattr("unet_edge.deploy.measure.measure_accuracy", refuse)
    monkeypatch.setattr("unet_edge.bench.time_interleaved", refuse)
    tiny, other = deployed["checkpoints"]
    result = cli(
        "deploy",
        str(tiny),
        str(other),
        "--format",
        "onnx,torchscript",
        "--precision",
        "fp32",
        "--image-size",
        "48",
        "--seconds",
        "0.05",
        "--min-calls",
        "6",
        "--threads",
        "1",
        "--max-miou-drop",
        "1",
        "--out",
        str(deployed["out"]),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    after = json.loads((deployed["out"] / "deploy.json").read_text())
    assert after["winner"] == before["winner"] and after["candidates"] == before["candidates"]


def test_missing_checkpoint_is_a_one_line_error(tmp_path, cli, one_line_error):
    result = cli("deploy", str(tmp_path / "nope.pt"), "--format", "onnx", "--out", str(tmp_path / "out"))
    one_line_error(result, "nope.pt", "not found")


@pytest.mark.slow
def test_a_failing_export_is_a_row_with_its_reason_not_an_abort(tiny_checkpoint, tmp_path, monkeypatch):
    from dataclasses import replace

    from unet_edge.errors import ArtifactError

    def no_converter(request):
        raise ArtifactError("converter crashed\nsecond line of its message")

    monkeypatch.setitem(FORMATS, "torchscript", replace(FORMATS["torchscript"], export=no_converter))
    monkeypatch.setitem(FORMATS, "onnx", replace(FORMATS["onnx"], export_variants=no_converter))
    options = DeployOptions(
        checkpoints=(tiny_checkpoint,),
        formats=("onnx", "torchscript"),
        precisions=(Precision.FP32, Precision.INT8),
        image_size=(48, 48),
        seconds=0.02,
        min_calls=3,
        out=tmp_path,
        threads=1,
        jobs=1,  # the patched registry is this process's
    )
    updates = []
    result = run_deploy(options, lambda done, total, status: updates.append((done, total, status)))
    rows = {(c.format, c.precision): c for c in result.candidates}
    # one bar over all candidates: it only moves forward, against one total, and ends full
    assert len({total for _, total, _ in updates[1:]}) == 1
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(updates)) and updates[-1][0] == updates[-1][1]
    assert any("timing" in status for _, _, status in updates)
    assert set(rows) == {("onnx", "fp32"), ("onnx", "int8"), ("torchscript", "fp32")}
    assert (
        rows[("onnx", "int8")].rejected
        == rows[("torchscript", "fp32")].rejected
        == "export failed: ArtifactError: converter crashed"
    )
    assert result.decision.winner is rows[("onnx", "fp32")] and rows[("onnx", "fp32")].p50 is not None
    report = json.loads((tmp_path / "deploy.json").read_text())
    assert sorted(r["rejected"] is None for r in report["candidates"]) == [False, False, True]


@pytest.mark.slow
def test_exports_in_worker_processes_give_the_serial_figures_and_a_cache_that_resumes(deployed, tmp_path, monkeypatch):
    """The same deploy with two export workers: stopped by Ctrl-C once the first export finished, then run again
    in this process, which exports only what the workers had not finished; the figures are the serial run's."""
    import unet_edge.export

    options = DeployOptions(
        checkpoints=deployed["checkpoints"],
        formats=("onnx", "torchscript"),
        precisions=(Precision.FP32,),
        image_size=(48, 48),
        seconds=0.05,
        min_calls=6,
        out=tmp_path,
        threads=1,
        jobs=2,
        max_miou_drop=1.0,  # as `deployed`: both checkpoints compete
    )
    labels = []

    def ctrl_c(done, total, label):
        labels.append(label)
        if done >= 3:  # 1 unit per checkpoint's own mIoU, then 2 per candidate: one export finished
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_deploy(options, ctrl_c)
    assert any(label.startswith("exporting in 2 processes") for label in labels)
    cached = [k for k in json.loads((tmp_path / "deploy-cache.json").read_text()) if k.startswith("export:")]
    assert 1 <= len(cached) < 4
    exports = []
    real_export = unet_edge.export.run_export
    monkeypatch.setattr(
        unet_edge.export, "run_export", lambda opts, *a, **k: exports.append(opts) or real_export(opts, *a, **k)
    )
    run_deploy(replace(options, jobs=1))
    assert len(exports) == 4 - len(cached)

    serial = {
        (r["model"], r["format"]): r for r in json.loads((deployed["out"] / "deploy.json").read_text())["candidates"]
    }
    rows = json.loads((tmp_path / "deploy.json").read_text())["candidates"]
    assert {(r["model"], r["format"]) for r in rows} == set(serial)
    for row in rows:
        expected = serial[(row["model"], row["format"])]
        for field in ("miou", "miou_drop", "pixel_agreement"):
            assert row[field] == pytest.approx(expected[field], abs=1e-12), (row["format"], field)
        assert (row["rejected"] is None) == (expected["rejected"] is None)


def test_a_worker_cache_copies_entries_and_reports_what_it_added(tmp_path):
    from unet_edge.deploy.cache import DeployCache

    on_disk = DeployCache(tmp_path / "cache.json")
    on_disk.put("export:a", {"x": 1})
    worker = DeployCache(None, on_disk.entries)
    worker.put("measure:b", {"miou": 0.5})
    assert worker.get("export:a") == {"x": 1} and worker.added == {"measure:b": {"miou": 0.5}}
    assert on_disk.get("measure:b") is None and not (tmp_path / "None").exists()
    assert json.loads((tmp_path / "cache.json").read_text()) == {"export:a": {"x": 1}}


def test_an_export_worker_ends_when_the_deploy_process_is_gone():
    """A deploy killed (or stopped by a signal that skips its clean-up) leaves no export worker running on."""
    import multiprocessing
    import subprocess

    from unet_edge.processes import exit_when_gone

    parent = subprocess.Popen(["sleep", "0.5"])  # stands for the deploy process
    worker = multiprocessing.get_context("fork").Process(target=exit_when_gone, args=(parent.pid, 0.05))
    worker.start()
    parent.wait()  # gone, and reaped
    worker.join(timeout=30)
    if worker.is_alive():
        worker.kill()
    assert worker.exitcode == 1
