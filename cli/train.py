"""`unet-edge train`: fit a UNetStudent and write a run folder (best.pt, last.pt, metrics.jsonl, curves.png).

With `--nproc-per-node N` it starts N workers through `torch.distributed.run` (torchrun's engine),
each running this same command; a worker started by `torchrun` joins the process group it set up.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperOption

from unet_edge.config import (
    DEFAULT_EPOCHS,
    DEFAULT_HFLIP,
    LR_AT_REFERENCE_WIDTH,
    LR_REFERENCE_WIDTH,
    MAX_SCHEDULE_EPOCHS,
    SCHEDULE_MIN_CROPS,
    BlockOrder,
    DistillLoss,
    DistillPixels,
    Loss,
    ModelConfig,
    TrainConfig,
    Upsample,
)
from unet_edge.hooks import TrainHooks

from .common import (
    DataOption,
    DeviceOption,
    by_field_name,
    console,
    err_console,
    fmt,
    handle_errors,
    iou_table,
    progress_bar,
)

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

DEFAULTS = TrainConfig()


def _scale_range(value: str) -> tuple[float, float]:
    """Parse --scale-jitter: "MIN,MAX" (e.g. 0.5,2.0) or "off" (= 1,1)."""
    if value.strip().lower() == "off":
        return 1.0, 1.0
    try:
        low, high = (float(part) for part in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{value!r}: expected MIN,MAX (e.g. 0.5,2.0) or off") from None
    if not 0 < low <= high:
        raise typer.BadParameter(f"{value!r}: need 0 < MIN <= MAX")
    return low, high


def _scale_text(low: float, high: float) -> str:
    return "off" if low == high == 1.0 else f"{low:g},{high:g}"


def _given(ctx: typer.Context) -> set[str]:
    """The options the user gave (on the command line or through the environment), not left at their defaults."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {
        name
        for name, source in sources.items()
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")
    }


def _command_args(ctx: typer.Context, skip: set[str]) -> list[str]:
    """The command line that reproduces this invocation's given options, minus those in `skip`."""
    args: list[str] = []
    given = _given(ctx)
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, TyperOption) or param.name in skip or param.name not in given or value is None:
            continue
        if param.is_flag:
            flag = param.opts[0] if value else next(iter(param.secondary_opts), None)
            args.extend([flag] if flag else [])
        else:
            for item in value if isinstance(value, (list, tuple)) else [value]:
                args.extend([param.opts[0], str(item)])
    return args


def _train_config(options: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of the command's options: each field takes the option of its name, the model options fill
    `model`; --scale-jitter gives two fields, paths are stored as text, and --teacher as absolute ones."""
    scale_min, scale_max = _scale_range(options["scale_jitter"])
    teacher = options["teacher"]
    return TrainConfig(
        **by_field_name(
            TrainConfig,
            options,
            data=_text(options["data"]),
            epochs=options["epochs"],
            scale_min=scale_min,
            scale_max=scale_max,
            teacher=_teacher_text(teacher),
            model=replace(DEFAULTS.model, **by_field_name(ModelConfig, options)),
            out=str(options["out"]),
            resume=_text(options["resume"]),
        )
    )


def _teacher_text(teachers: list[Path] | None) -> str | tuple[str, ...] | None:
    """--teacher as TrainConfig stores it: one absolute path, or an ensemble's in the order given."""
    if not teachers:
        return None
    paths = tuple(str(path.resolve()) for path in teachers)
    return paths[0] if len(paths) == 1 else paths


def _text(path: Path | None) -> str | None:
    return str(path) if path is not None else None


class _ProgressHooks(TrainHooks):
    """Training progress on the terminal: a bar for the data check and one for the steps, a line per epoch."""

    def __init__(self, progress: Progress, processes: str) -> None:
        self.progress, self.processes = progress, processes
        self.task: TaskID | None = None
        self.scan_task: TaskID | None = None

    def on_scan(self, done: int, total: int) -> None:
        if self.scan_task is None:
            self.scan_task = self.progress.add_task("check data", total=total, status="")
        self.progress.update(self.scan_task, completed=done)

    def on_note(self, message: str) -> None:
        err_console.print(message, markup=False, highlight=False, soft_wrap=True)

    def on_start(self, run_dir: Path, epochs: int, steps_per_epoch: int, start_epoch: int, device: str) -> None:
        err_console.print(f"training on {device}{self.processes}, run folder {run_dir}")
        self.task = self.progress.add_task(
            "train", total=(epochs - start_epoch) * steps_per_epoch, status="", start=True
        )

    def on_step(self, epoch: int, step: int, loss: float) -> None:
        if self.task is None:  # no step comes before on_start
            return
        self.progress.update(self.task, advance=1, description=f"epoch {epoch + 1}", status=f"loss {loss:.4f}")

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        teacher = (
            f", teacher {record['teacher_share']:.0%} of step time" if record.get("teacher_share") is not None else ""
        )
        self.progress.console.print(
            f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  train mIoU {fmt(record.get('train_miou'))}  "
            f"val mIoU {fmt(record['miou'])}  "
            f"{fmt(record['train_images_per_s'], 1)} img/s  {record['epoch_time_s']:.1f} s "
            f"(waiting for data {record['data_time_s']:.1f} s{teacher})"
        )


@handle_errors
def train(
    ctx: typer.Context,
    data: DataOption = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"Epochs to train in all (default {DEFAULT_EPOCHS}, more on a training set under "
            f"{SCHEDULE_MIN_CROPS // DEFAULT_EPOCHS} images: enough to see {SCHEDULE_MIN_CROPS:,} crops, 16 / base "
            f"times as many below base 16, at most {MAX_SCHEDULE_EPOCHS}; with --resume, the saved run's).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step (per process).")] = DEFAULTS.batch_size,
    lr: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Peak AdamW learning rate (warm-up, then cosine decay); default: "
            f"{LR_AT_REFERENCE_WIDTH:g}, times ({LR_REFERENCE_WIDTH} / --base-channels)² below base "
            f"{LR_REFERENCE_WIDTH} (narrow models need larger steps).",
        ),
    ] = DEFAULTS.lr,
    image_size: Annotated[int, typer.Option(min=8, help="Side of the random training crop.")] = DEFAULTS.image_size,
    hflip: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            show_default=False,
            help=f"Probability of a horizontal flip per training image; 0 turns it off. Default: {DEFAULT_HFLIP:g} "
            'when the data\'s dataset.json says "mirror_symmetric": true (the embedded set does), else 0 (characters, '
            "text, signs and left/right anatomy are not the same mirrored).",
        ),
    ] = DEFAULTS.hflip,
    scale_jitter: Annotated[
        str,
        typer.Option(
            metavar="MIN,MAX",
            help="Resize each training image by a random factor in MIN..MAX before the crop (e.g. 0.5,2.0), or off.",
        ),
    ] = _scale_text(DEFAULTS.scale_min, DEFAULTS.scale_max),
    ema_decay: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.9999,
            help="Validate and save an exponential moving average of the weights with this decay per step; 0 turns it "
            "off.",
        ),
    ] = DEFAULTS.ema_decay,
    loss: Annotated[
        Loss,
        typer.Option(
            help="Training loss: cross-entropy (ce), or cross-entropy plus soft Dice (dice-ce), which weighs small "
            "classes like large ones."
        ),
    ] = Loss(DEFAULTS.loss),
    teacher: Annotated[
        list[Path] | None,
        typer.Option(
            help="Distil from this model: a larger run's checkpoint (RUN/best.pt) or a TorchScript export, with the "
            "same classes and normalisation. Given more than once: from the ensemble of the models (the mean of their "
            "class probabilities), such as students of this width trained on other seeds.",
        ),
    ] = None,
    distill_loss: Annotated[
        DistillLoss,
        typer.Option(
            help="With --teacher: pixel-wise KL over the classes (kl), channel-wise divergence over each class map's "
            "pixels (cwd), or DIST's inter- and intra-class correlation (dist)."
        ),
    ] = DistillLoss(DEFAULTS.distill_loss),
    distill_weight: Annotated[
        float, typer.Option(min=0.0, help="With --teacher: weight of the distillation term in the loss.")
    ] = DEFAULTS.distill_weight,
    distill_temperature: Annotated[
        float,
        typer.Option(
            help="With --teacher: softmax temperature (> 0) of the distillation term, which is scaled by its square."
        ),
    ] = DEFAULTS.distill_temperature,
    distill_warmup: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="With --teacher: fraction of the run over which the term's weight rises linearly from 0.",
        ),
    ] = DEFAULTS.distill_warmup,
    distill_pixels: Annotated[
        DistillPixels,
        typer.Option(
            help="With --teacher: the pixels the term counts: every labelled one (all), or only those the teacher "
            "labels right (teacher-right), so that its mistakes are not taught.",
        ),
    ] = DistillPixels(DEFAULTS.distill_pixels),
    distill_cache: Annotated[
        bool | None,
        typer.Option(
            "--distill-cache/--no-distill-cache",
            help="With --teacher: compute the teacher's logits once per training image and crop them with it "
            "(default: when they fit in memory), or run the teacher in every step.",
        ),
    ] = DEFAULTS.distill_cache,
    base_channels: Annotated[
        int, typer.Option(min=1, help="Channels of the first U-Net level.")
    ] = DEFAULTS.model.base_channels,
    depth: Annotated[int, typer.Option(min=1, help="Number of down/up-sampling levels.")] = DEFAULTS.model.depth,
    num_convs: Annotated[int, typer.Option(min=1, help="Convolutions per block.")] = DEFAULTS.model.num_convs,
    upsample: Annotated[Upsample, typer.Option(help="How the decoder upsamples.")] = Upsample(DEFAULTS.model.upsample),
    block_order: Annotated[
        BlockOrder, typer.Option(help="conv-relu-bn (the seed's) or conv-bn-relu (folds fully for int8 deployment).")
    ] = BlockOrder(DEFAULTS.model.block_order),
    device: DeviceOption = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (bf16 where supported, else fp16).")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    workers: Annotated[
        int | None, typer.Option(min=0, help="Data-loading workers (default: 0 on CPU, up to 8 on CUDA).")
    ] = None,
    cache: Annotated[
        bool | None,
        typer.Option(
            "--cache/--no-cache",
            help="Keep decoded images in memory after their first epoch (default: when they fit in a quarter of free "
            "memory and --workers is 0).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = DEFAULTS.seed,
    out: Annotated[Path, typer.Option(help="Folder for run folders.")] = Path(DEFAULTS.out),
    name: Annotated[str | None, typer.Option(help="Run folder name (default: unet, unet-2, ...).")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue from this checkpoint (usually RUN/last.pt) with its run's settings; --data and --epochs may "
            "change."
        ),
    ] = None,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            min=1,
            help="Distributed data parallel: start this many worker processes (one per GPU) via torch.distributed.run.",
        ),
    ] = 1,
) -> None:
    """Train a UNetStudent (on the embedded synthetic set unless --data is given)."""
    from unet_edge.distributed import distributed_context, launch_training
    from unet_edge.train import fit

    if nproc_per_node > 1:
        launch_training("unet_edge_cli.main", ["train", *_command_args(ctx, {"nproc_per_node"})], nproc_per_node, data)
        return

    given = _given(ctx)
    unused = [
        f"--{name.replace('_', '-')}"
        for name in (f.name for f in fields(TrainConfig) if f.name.startswith("distill_"))
        if name in given
    ]
    if unused and not teacher and resume is None:
        raise typer.BadParameter(f"{', '.join(unused)} only apply with --teacher")
    if distill_temperature <= 0:
        raise typer.BadParameter(f"{distill_temperature:g}: must be > 0", param_hint="--distill-temperature")
    config = _train_config(locals())
    with (
        distributed_context(device) as distributed,
        progress_bar(enabled=distributed is None or distributed.is_main) as progress,
    ):
        processes = f" x {distributed.world_size} processes" if distributed is not None else ""
        explicit = given | ({"scale_min", "scale_max"} if "scale_jitter" in given else set())
        result = fit(config, _ProgressHooks(progress, processes), distributed, explicit=explicit)
    if distributed is not None and not distributed.is_main:
        return
    last = result.history[-1]
    console.print(
        iou_table(result.classes, list(last["per_class_iou"].values()), last["miou"], f"val IoU, epoch {last['epoch']}")
    )
    console.print(
        f"best val mIoU {fmt(result.best_miou)} at epoch {result.best_epoch}; wrote {result.run_dir}/best.pt, last.pt, "
        f"metrics.jsonl, curves.png"
    )
