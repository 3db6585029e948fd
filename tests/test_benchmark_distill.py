"""benchmarks/distill.py's section: the CPU kernels each run was computed with (seeded runs repeat to the last digit
only on one CPU kind, so it names the kinds of its runs and every pair whose two runs differ), its students and its
teachers' time."""

import pytest
import torch


@pytest.fixture
def distill(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import distill

    return distill


def _checkpoint(**fields):
    """A last.pt with the keys every unet-edge checkpoint holds, and `fields`."""
    from unet_edge.checkpoint import _REQUIRED_KEYS

    return {**dict.fromkeys(_REQUIRED_KEYS), "epoch": 6, **fields}


def _run(folder, *kinds):
    folder.mkdir()
    environments = [{"from_epoch": 3 * i, "device": "cpu", "cpu_capability": kind} for i, kind in enumerate(kinds)]
    torch.save(_checkpoint(environments=environments), folder / "last.pt")
    return folder


def _section_args(teacher: str):
    """distill.py's arguments as `section` reads them: two seeds at the default schedule, `teacher` as given."""
    import argparse

    return argparse.Namespace(
        seeds=2,
        epochs_given=False,
        epochs=60,
        teacher=teacher,
        batch_size=8,
        image_size=64,
        train_images=240,
        val_images=60,
        threads=1,
    )


def test_a_runs_cpu_kernels_come_from_its_checkpoint(distill, tmp_path):
    assert distill.cpu_kernels(_run(tmp_path / "one", "AVX2")) == "AVX2"
    assert distill.cpu_kernels(_run(tmp_path / "moved", "AVX512", "AVX2")) == "AVX512+AVX2"
    assert distill.cpu_kernels(_run(tmp_path / "back", "AVX2", "AVX512", "AVX2")) == "AVX2+AVX512"
    older = tmp_path / "older"
    older.mkdir()
    torch.save(_checkpoint(), older / "last.pt")  # a checkpoint from before runs recorded it
    assert distill.cpu_kernels(older) is None
    assert distill.cpu_kernels(tmp_path / "missing") is None


def test_the_section_names_pairs_computed_with_different_kernels(distill):
    def run(seed, kind):
        return {"seed": seed, "best": 0.9, "cpu_kernels": kind}

    teacher = run(0, "AVX512")
    alone = [run(0, "AVX512"), run(1, "AVX512"), run(2, None)]
    distilled = [run(0, "AVX512"), run(1, "AVX2"), run(2, "AVX2")]
    rows = [("shapes", (8, 3), "dist", teacher, alone, distilled)]
    note = distill.kernels_note(rows, [("shapes", (8, 3), alone)])
    assert note.startswith("CPU kernels of the runs: AVX2 2, AVX512 4, not recorded 1.")
    # seed 1 crossed kinds; seed 2's lone run has no record, so it is not called a crossed pair
    assert "**1 pair(s) compare runs computed with different CPU kernels**" in note
    assert note.endswith(": shapes b8-d3 dist s1 (AVX2 vs AVX512).")
    same = [run(0, "AVX512"), run(1, "AVX512"), run(2, "AVX512")]
    assert "pair(s)" not in distill.kernels_note([("shapes", (8, 3), "dist", teacher, same, same)], [])


def test_the_section_names_the_students_before_any_is_distilled(distill):
    """The section of a run whose teachers are still training (lone students only) names its students all the same."""
    from types import SimpleNamespace

    args = _section_args("32,4")
    alone = [{"seed": s, "best": b, "train_seconds": 400.0, "cpu_kernels": "AVX2"} for s, b in ((0, 0.96), (1, 0.97))]
    distilled = "shapes-distilled-dist-T1-w1-teacher-right-hflip0.5-ep120-b8-d3-s0"  # not a teacher's run
    runner = SimpleNamespace(
        results={"shapes-teacher-b32-d4-s0": {"train_seconds": 1500.0}, distilled: {"train_seconds": 500.0}}
    )
    costs = {"teacher": (32, 4, 24.55, None), "student b8": (8, 3, 1.28, None)}
    text = distill.section(args, [("shapes", (8, 3), alone)], [], costs, runner, "a machine", {"shapes": "-hflip0.5"})
    assert "Teacher UNetStudent base 32, depth 4 (one per dataset, seed 0); students base 8, depth 3, alone" in text
    assert "| shapes | b8-d3 | 0.965 ± 0.007 | 0.005 | s0 0.960, s1 0.970 | 400 |" in text
    assert "A teacher run took 1500 s. 2 runs cached" in text


def test_an_ensemble_row_teaches_each_seed_with_the_other_seeds(distill, tmp_path):
    from types import SimpleNamespace

    lone = [tmp_path / f"s{seed}" / "best.pt" for seed in range(3)]
    assert distill.leave_one_out(lone) == [
        ["--teacher", str(lone[1]), "--teacher", str(lone[2])],
        ["--teacher", str(lone[0]), "--teacher", str(lone[2])],
        ["--teacher", str(lone[0]), "--teacher", str(lone[1])],
    ]
    alone = [{"seed": s, "best": b, "train_seconds": 300.0, "cpu_kernels": "AVX2"} for s, b in enumerate((0.9, 0.92))]
    distilled = [
        {"seed": s, "best": b, "train_seconds": 310.0, "cpu_kernels": "AVX2", "teacher_miou": t}
        for s, b, t in ((0, 0.93, 0.95), (1, 0.94, 0.97))
    ]
    teacher = distill.ensemble_teacher(distilled)
    assert teacher["best"] == pytest.approx(0.96) and teacher["members"] == [0.95, 0.97]
    rows = [("digits", (8, 3), "dist-ens1", teacher, alone, distilled)]
    # The ensembles are not runs of their own: the kernels note counts the students only.
    assert distill.kernels_note(rows, [("digits", (8, 3), alone)]).startswith("CPU kernels of the runs: AVX2 4.")
    args = _section_args("ensemble")
    runner = SimpleNamespace(results={"digits-teacher-b32-d4-s0": {"train_seconds": 1500.0}})
    costs = {"student b8": (8, 3, 1.28, None)}
    text = distill.section(args, [("digits", (8, 3), alone)], rows, costs, runner, "a machine", {"digits": ""})
    assert "Teacher of seed k: the ensemble of the same student's lone runs on the other 1 seeds" in text
    assert "the schedule `unet-edge train` picks for the set and the model's width (120 epochs for base 8)" in text
    # teacher 0.960 ± 0.014; alone 0.910; distilled 0.935: half the gap closed; worst pair +0.020
    # pairs +0.030 and +0.020: sd 0.007, against sqrt(2) x 0.014 = 0.020 for independent draws
    assert (
        "| digits | b8-d3 | dist-ens1 | 0.960 ± 0.014 | 0.910 ± 0.014 | 0.935 ± 0.007 | 50% | +0.020 | 0.007 (0.020) |"
        in text
    )
    assert "A teacher run took" not in text  # no teacher run of its own
