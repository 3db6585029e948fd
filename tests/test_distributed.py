"""Distributed data parallel training on CPU (gloo): real worker processes through torch.distributed.run."""

import functools
import json
import operator
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from unet_edge.checkpoint import load_checkpoint
from unet_edge.distributed import DistContext, ShardSampler
from unet_edge.metrics import ConfusionMatrix

TINY = ["--batch-size", "8", "--image-size", "32", "--base-channels", "4", "--depth", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def odd_val_data(tiny_data, tmp_path_factory) -> Path:
    """The tiny set with 5 val images, so 2 ranks cannot split it evenly (DistributedSampler would pad)."""
    root = tmp_path_factory.mktemp("odd") / "tiny"
    shutil.copytree(tiny_data, root)
    dropped = sorted((root / "val" / "images").iterdir())[-1]
    dropped.unlink()
    (root / "val" / "labels" / f"{dropped.stem}.png").unlink()
    return root


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_eval_matches(checkpoint: Path, data: Path, record: dict, tmp_path: Path, cli) -> None:
    """Single-process `unet-edge eval` of `checkpoint` gives the IoUs that training logged (to 1e-4)."""
    out = tmp_path / f"eval-{checkpoint.parent.name}.json"
    result = cli("eval", str(checkpoint), "--data", str(data), "--device", "cpu", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["miou"] == pytest.approx(record["miou"], abs=1e-4)
    assert report["per_class_iou"] == pytest.approx(record["per_class_iou"], abs=1e-4)


def test_shard_sampler_covers_each_item_once_without_padding():
    shards = [list(ShardSampler(range(7), rank, 3)) for rank in range(3)]
    assert sorted(functools.reduce(operator.iadd, shards, [])) == list(range(7))
    assert [len(ShardSampler(range(7), rank, 3)) for rank in range(3)] == [3, 2, 2]


def _collectives_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    context = DistContext(rank, rank, 2, torch.device("cpu"))
    loss, seen = context.reduce_loss(float(rank + 1), rank + 2)
    confusion = ConfusionMatrix(2)
    confusion.update(torch.tensor([rank, 1]), torch.tensor([rank, 0]))
    confusion.reduce_from_all_processes()
    path = context.broadcast_path(Path(f"runs/picked-by-{rank}"))
    norm = nn.BatchNorm1d(3)
    norm.running_mean.fill_(float(rank + 10))
    context.broadcast_buffers(norm)
    result = {
        "loss": loss,
        "seen": seen,
        "summed": confusion.matrix.tolist(),
        "path": str(path),
        "mean": norm.running_mean.tolist(),
    }
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_collectives_weight_loss_by_images_and_follow_rank_zero(tmp_path):
    mp.spawn(_collectives_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result["loss"] == pytest.approx((1 * 2 + 2 * 3) / 5) and result["seen"] == 5
        assert result["summed"] == [[1, 2], [0, 1]]  # rank 0 saw (0->0, 0->1), rank 1 (1->1, 0->1)
        assert result["path"] == "runs/picked-by-0"
        assert result["mean"] == [10.0, 10.0, 10.0]


@pytest.mark.slow
def test_two_process_epoch_logs_the_miou_of_single_process_eval(odd_val_data, tmp_path, cli):
    result = cli(
        "train",
        "--nproc-per-node",
        "2",
        "--data",
        str(odd_val_data),
        "--epochs",
        "1",
        *TINY,
        "--no-amp",
        "--out",
        str(tmp_path),
        "--name",
        "ddp",
        in_process=False,
    )
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    run = tmp_path / "ddp"
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt"]
    records = metrics(run)
    assert len(records) == 1 and records[0]["epoch"] == 1
    assert records[0]["train_images_per_s"] > 0
    state = load_checkpoint(run / "best.pt")
    assert state["config"]["base_channels"] == 4 and state["config"]["depth"] == 2
    assert state["train_config"]["batch_size"] == 8 and state["train_config"]["amp"] is False
    assert state["train_config"]["model"]["base_channels"] == 4
    assert_eval_matches(run / "best.pt", odd_val_data, records[0], tmp_path, cli)
    assert result.stdout.count("best val mIoU") == 1  # only rank 0 reports
    assert "x 2 processes" in result.stderr


@pytest.mark.slow
def test_distributed_resume_continues_the_same_run(odd_val_data, tmp_path, interrupted_run, cli):
    run = interrupted_run(odd_val_data, tmp_path, epochs=2, stop_in_epoch=2, lr=0.02)  # one process wrote epoch 1
    resumed = cli(
        "train", "--nproc-per-node", "2", "--device", "cpu", "--resume", str(run / "last.pt"), in_process=False
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    records = metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and last["train_config"]["lr"] == 0.02 and last["config"]["base_channels"] == 4
    assert_eval_matches(run / "last.pt", odd_val_data, records[-1], tmp_path, cli)


def test_nproc_per_node_inside_torchrun_is_a_clean_error(tmp_path, cli):
    result = cli(
        "train", "--nproc-per-node", "2", *TINY, env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}, cwd=tmp_path
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip() == "error: --nproc-per-node starts its own workers: drop it when launching with torchrun"
    )


@pytest.mark.slow
def test_failing_workers_end_in_a_one_line_error(tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli(
        "train", "--nproc-per-node", "2", "--data", str(empty), *TINY, "--out", str(tmp_path), in_process=False
    )
    said = result.stdout[-2000:] + result.stderr[-4000:]  # shown when an assertion fails
    assert result.returncode == 1, said
    assert f"error: {empty / 'train' / 'images'}: folder not found" in result.stderr, said
    assert "error: distributed worker rank" in result.stderr and "Traceback" not in result.stderr, said
