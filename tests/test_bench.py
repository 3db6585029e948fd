import json
import re

import pytest

from unet_edge.bench import count_gflops, latency_stats, time_interleaved


@pytest.fixture(scope="session")
def bench_export(exported_all):
    return exported_all[0].parent


# What converters and runtimes print when nobody captures it: LiteRT's step log, absl/TFLite INFO lines,
# cpuinfo's probing, PyTorch's deprecation warnings, glog-style lines.
THIRD_PARTY = re.compile(
    r"\[(START| DONE)\]|^INFO:|^WARNING:|^[IWE]\d{4} |cpuinfo|midr|XNNPACK|Warning|deprecated", re.M
)


@pytest.mark.slow
def test_export_all_and_verify_print_only_the_projects_own_lines(exported_all, cli):
    folder, export = exported_all
    assert export.stderr == ""
    assert THIRD_PARTY.findall(export.stdout) == [], export.stdout
    assert "wrote " in export.stdout and "manifest: " in export.stdout
    verify = cli("verify", "--exported", str(folder.parent), "--num-images", "2", in_process=False)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    assert THIRD_PARTY.findall(verify.stdout) == [], verify.stdout
    tflite = folder / "model.tflite"
    if tflite.is_file():  # --verbose lets them through: the capture above hid real output
        loud = cli("--verbose", "verify", str(tflite), "--num-images", "1", in_process=False)
        assert loud.returncode == 0 and "XNNPACK" in loud.stderr, loud.stderr


@pytest.mark.slow
def test_bench_json_has_every_field_and_lists_unavailable_providers(bench_export, tmp_path, cli):
    report_path, md_path, png_path = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    result = cli(
        "bench",
        "--exported",
        str(bench_export),
        "--batch-sizes",
        "1,2",
        "--image-size",
        "40x56",
        "--iters",
        "6",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
        str(report_path),
        "--markdown",
        str(md_path),
        "--plot",
        str(png_path),
        in_process=False,  # --threads 1: ExecuTorch's thread pool is fixed once a program is loaded in a process
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert {"cpu", "cpu_int8_bf16", "cores", "threads", "torch", "onnxruntime", "matmul_gflops_per_s"} <= set(
        report["machine"]
    )
    assert report["machine"]["threads"] == 1
    ok = [r for r in report["results"] if r["status"] == "ok"]
    measured = {(r["backend"], r["provider"], r["batch_size"]) for r in ok}
    for backend, provider in (("pytorch", "cpu"), ("torchscript", "cpu"), ("onnxruntime", "CPUExecutionProvider")):
        assert {(backend, provider, 1), (backend, provider, 2)} <= measured
    fields = {
        "backend",
        "provider",
        "precision",
        "batch_size",
        "height",
        "width",
        "latency_ms",
        "throughput_ips",
        "gflops_per_image",
        "gflops_per_s",
        "roofline_fraction",
        "file_mb",
        "status",
    }
    for r in ok:
        assert fields <= set(r)
        lat = r["latency_ms"]
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
        assert (r["height"], r["width"]) == (40, 56) and r["iterations"] >= 6
        assert r["gflops_per_image"] > 0 and r["throughput_ips"] > 0 and r["roofline_fraction"] > 0
        assert r["gflops_per_s"] == pytest.approx(r["gflops_per_image"] * r["throughput_ips"])
    assert not any(
        r["backend"] in ("pytorch", "torchscript") and "Tensorrt" in r["provider"] for r in report["results"]
    )
    unavailable = [r for r in report["results"] if r["status"] != "ok"]
    import torch

    if not torch.cuda.is_available():
        providers = {r["provider"] for r in unavailable}
        assert {"CUDAExecutionProvider", "TensorrtExecutionProvider", "cuda"} <= providers
        assert all(r["status"].startswith("unavailable: ") and len(r["status"]) > 20 for r in unavailable)
        assert "CUDAExecutionProvider: not in this onnxruntime build" in result.stdout
    assert md_path.read_text().startswith("| model | backend |")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_stats_are_ordered_percentiles():
    stats = latency_stats([5.0, 1.0, 3.0, 2.0, 4.0, 100.0])
    assert stats["min"] == 1.0 and stats["p50"] == 3.5
    assert stats["p50"] <= stats["p90"] <= stats["p99"] <= 100.0
    assert stats["mean"] == pytest.approx(115 / 6)


@pytest.mark.slow
def test_interleaved_timing_gives_each_runner_its_iterations():
    calls = {"a": 0, "b": 0}

    def make(name):
        def run():
            calls[name] += 1

        return run

    latencies = time_interleaved([make("a"), make("b")], warmup=2, iters=7, seconds=0.0)
    assert [len(x) for x in latencies] == [7, 7]
    assert calls["a"] >= 7 + 2 and calls["b"] >= 7 + 2


def test_seconds_is_the_timed_budget_of_each_row_fast_or_slow(monkeypatch):
    """`--seconds` per row: a 1 ms and a 20 ms runner each get at least that much timed work and at most
    one more block of calls, on a virtual clock (so a busy machine cannot change the outcome)."""
    import unet_edge.bench.timing as timing

    clock = {"now": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])

    def runner(ms):
        def run():
            clock["now"] += ms / 1000.0

        return run

    rounds = []
    latencies = time_interleaved(
        [runner(1), runner(20)],
        warmup=1,
        iters=None,
        seconds=0.3,
        min_iters=5,
        progress=lambda done, total, label: rounds.append(done / total),
    )
    block_s = 0.3 / 4  # time_interleaved's block for a short budget
    for samples, ms in zip(latencies, (1, 20)):
        assert samples == pytest.approx([ms] * len(samples))
        assert 300.0 <= sum(samples) < 300.0 + block_s * 1000.0 + ms and len(samples) >= 5
    assert len(latencies[0]) > 4 * len(latencies[1])  # the fast row is not held to the slow row's call count
    assert rounds == sorted(rounds) and rounds[-1] == pytest.approx(1.0) and 0 < rounds[0] < 1


def test_a_runner_given_no_seconds_gets_its_min_calls_only(monkeypatch):
    """Per-runner budgets (deploy's screening round gives each candidate a tenth): the other keeps its seconds."""
    import unet_edge.bench.timing as timing

    clock = {"now": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])

    def runner(ms):
        def run():
            clock["now"] += ms / 1000.0

        return run

    fast, dropped = time_interleaved([runner(1), runner(1)], warmup=1, iters=None, seconds=[0.3, 0.0], min_iters=5)
    assert sum(fast) >= 300.0 and len(dropped) == 5


def test_a_runner_held_to_its_min_calls_is_not_doubled_by_untimed_calls(monkeypatch):
    """Each block of calls starts with one untimed call; a 50 ms runner with no seconds (deploy's screening, or what
    cannot win) gets its 10 timed calls in blocks of at least half of them, not ten blocks of one (20 calls)."""
    import unet_edge.bench.timing as timing

    clock = {"now": 0.0}
    calls = [0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])

    def run():
        calls[0] += 1
        clock["now"] += 0.05

    (samples,) = time_interleaved([run], warmup=1, iters=None, seconds=0.0, min_iters=10)
    assert len(samples) == 10
    assert calls[0] <= 1 + 10 + 2  # the warm-up call, the timed calls, one untimed call per block of 5


@pytest.mark.slow
def test_bf16_rows_are_skipped_with_the_reason_on_a_cpu_without_bf16_instructions(tiny_checkpoint, monkeypatch):
    """An AVX2-only CPU emulates bf16 hundreds of times slower than fp32: its rows say why they were skipped, and
    no bf16 reference GEMM is measured (one took minutes there)."""
    from unet_edge.bench import BenchRow, BenchSpec, run_bench
    from unet_edge.cpuinfo import precision_skip_reason

    monkeypatch.setenv("UNET_EDGE_CPU_FLAGS", "fpu sse avx2 fma")
    reason = precision_skip_reason("bf16")
    assert reason is not None and "no bf16 instructions" in reason
    spec = BenchSpec(
        batch_sizes=(1,),
        height=32,
        width=32,
        threads=1,
        warmup=0,
        iters=2,
        torch_variants=("eager", "channels-last"),
        dtypes=("fp32", "bf16"),
    )
    report = run_bench([tiny_checkpoint], spec, ("cpu",))
    status = {(r["variant"], r["precision"]): r["status"] for r in report["results"]}
    assert status == {
        ("eager", "fp32"): "ok",
        ("channels-last", "fp32"): "ok",
        ("eager", "bf16"): f"unavailable: {reason}",
        ("channels-last", "bf16"): f"unavailable: {reason}",
    }
    assert list(report["machine"]["matmul_gflops_per_s"]) == ["cpu/fp32"]
    assert all(BenchRow.from_dict(row).to_dict() == row for row in report["results"])
    assert report["machine"]["cpu_int8_bf16"] == []


def test_flop_count_of_default_model_matches_hand_count():
    # stem conv 3->32 at 256x256: 2 * 3*3*3 * 32 * 256*256 FLOPs; the whole default net is ~24.3 GFLOP
    config = {"num_classes": 4, "base_channels": 32, "depth": 4}
    gflops = count_gflops(config, 256, 256)
    assert 23.0 < gflops < 26.0
    assert count_gflops(config, 128, 128) == pytest.approx(gflops / 4, rel=1e-6)


def test_machine_block_names_the_int8_and_bf16_instruction_sets_of_the_cpu():
    from unet_edge.bench import cpu_int8_bf16_flags

    cpuinfo = (
        "processor\t: 0\nmodel name\t: Some CPU\n"
        "flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_int8\n\nprocessor\t: 1\n"
    )
    assert cpu_int8_bf16_flags(cpuinfo) == ["avx512_vnni", "amx_int8", "avx512_bf16"]
    assert cpu_int8_bf16_flags("flags\t: fpu sse avx2 fma\n") == []
    assert cpu_int8_bf16_flags("") == []
