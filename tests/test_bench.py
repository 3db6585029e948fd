import json
import time

import pytest

from unet_edge.bench import count_gflops, latency_stats, time_interleaved

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def bench_export(tiny_checkpoint, tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("bench-export")
    result = cli("export", str(tiny_checkpoint), "--format", "all", "--out", str(out), "--name", "b", "--parity-images", "0")
    assert result.returncode == 0, result.stderr
    return out


def test_bench_json_has_every_field_and_lists_unavailable_providers(bench_export, tmp_path, cli):
    report_path, md_path, png_path = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "bench.png"
    result = cli(
        "bench", "--exported", str(bench_export), "--batch-sizes", "1,2", "--image-size", "40x56", "--iters", "6",
        "--warmup", "1", "--threads", "1", "--json", str(report_path), "--markdown", str(md_path), "--plot", str(png_path),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert {"cpu", "cpu_int8_bf16", "cores", "threads", "torch", "onnxruntime", "matmul_gflops_per_s"} <= set(report["machine"])
    assert report["machine"]["threads"] == 1
    ok = [r for r in report["results"] if r["status"] == "ok"]
    measured = {(r["backend"], r["provider"], r["batch_size"]) for r in ok}
    for backend, provider in (("pytorch", "cpu"), ("torchscript", "cpu"), ("onnxruntime", "CPUExecutionProvider")):
        assert {(backend, provider, 1), (backend, provider, 2)} <= measured
    fields = {"backend", "provider", "precision", "batch_size", "height", "width", "latency_ms", "throughput_ips",
              "gflops_per_image", "gflops_per_s", "roofline_fraction", "file_mb", "status"}
    for r in ok:
        assert fields <= set(r)
        lat = r["latency_ms"]
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
        assert (r["height"], r["width"]) == (40, 56) and r["iterations"] >= 6
        assert r["gflops_per_image"] > 0 and r["throughput_ips"] > 0 and r["roofline_fraction"] > 0
        assert r["gflops_per_s"] == pytest.approx(r["gflops_per_image"] * r["throughput_ips"])
    assert not any(r["backend"] in ("pytorch", "torchscript") and "Tensorrt" in r["provider"] for r in report["results"])
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


def test_interleaved_timing_gives_each_runner_its_iterations():
    calls = {"a": 0, "b": 0}

    def make(name):
        def run():
            calls[name] += 1
        return run

    latencies = time_interleaved([make("a"), make("b")], warmup=2, iters=7, seconds=0.0)
    assert [len(x) for x in latencies] == [7, 7]
    assert calls["a"] >= 7 + 2 and calls["b"] >= 7 + 2


def test_seconds_is_the_timed_budget_of_each_row_fast_or_slow():
    """`--seconds` per row: a 1 ms and a 20 ms runner each get at least that much timed work, and
    the two together take about twice the budget, not more."""

    def sleeper(ms):
        return lambda: time.sleep(ms / 1000.0)

    start = time.perf_counter()
    latencies = time_interleaved([sleeper(1), sleeper(20)], warmup=1, iters=None, seconds=0.3, min_iters=5)
    elapsed = time.perf_counter() - start
    for samples in latencies:
        assert sum(samples) >= 300.0 and len(samples) >= 5
    assert len(latencies[0]) > 4 * len(latencies[1])  # the fast row is not held to the slow row's call count
    assert elapsed < 2 * 0.3 * 2.5  # two rows of 0.3 s, with room for untimed calls and a busy machine


def test_flop_count_of_default_model_matches_hand_count():
    # stem conv 3->32 at 256x256: 2 * 3*3*3 * 32 * 256*256 FLOPs; the whole default net is ~24.3 GFLOP
    config = {"num_classes": 4, "base_channels": 32, "depth": 4}
    gflops = count_gflops(config, 256, 256)
    assert 23.0 < gflops < 26.0
    assert count_gflops(config, 128, 128) == pytest.approx(gflops / 4, rel=1e-6)


def test_machine_block_names_the_int8_and_bf16_instruction_sets_of_the_cpu():
    from unet_edge.bench import cpu_int8_bf16_flags

    cpuinfo = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_int8\n\nprocessor\t: 1\n"
    assert cpu_int8_bf16_flags(cpuinfo) == ["avx512_vnni", "amx_int8", "avx512_bf16"]
    assert cpu_int8_bf16_flags("flags\t: fpu sse avx2 fma\n") == []
    assert cpu_int8_bf16_flags("") == []
