"""The study: Optuna samples an architecture that fits the budget and the training settings that matter, each
trial is an ordinary training run folder, and val mIoU is reported every epoch to a pruner. The loop, the
samplers, the pruner and the storage are Optuna's; this module writes the objective and the space only.

Several processes (`--workers`) or machines (`--storage URL`) call `study.optimize` on one storage. A process
killed with kill -9 leaves its trial RUNNING: the heartbeat fails it once its grace period passes (another
worker's next trial checks), and a rerun of a search on its own SQLite file fails it at once; either way the
trial is queued again with the same parameters (Optuna's `RetryFailedTrialCallback`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from ..io import atomic_write_text
from .latency import SearchError
from .space import Architecture

__all__ = [
    "StudySpec",
    "check_storage",
    "counted_trials",
    "open_storage",
    "open_study",
    "optimize",
    "recover_stale_trials",
    "run_workers",
    "shown_url",
]

# The settings of a study (the space and what trains): a later run on the same study must use the same.
SPACE_ATTR = "unet_edge_space"


@dataclass(frozen=True)
class StudySpec:
    """Everything a worker process needs to open the study and train its trials (picklable)."""

    storage: str
    study_name: str
    architectures: tuple[Architecture, ...]
    latency_ms: dict[str, float]  # architecture name -> its best p50 in the latency table
    trials: int
    deadline: float | None  # time.time() after which no trial starts and a running one stops at its epoch's end
    trials_dir: str
    data: str
    teacher: str | None
    epochs: int
    batch_size: int
    image_size: int
    lr_range: tuple[float, float]
    distill_weight_range: tuple[float, float]
    seed: int
    device: str
    threads: int
    heartbeat_s: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "architectures": [asdict(a) for a in self.architectures]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudySpec:
        fields = {
            **data,
            "architectures": tuple(Architecture(**a) for a in data["architectures"]),
            "lr_range": tuple(data["lr_range"]),
            "distill_weight_range": tuple(data["distill_weight_range"]),
        }
        return cls(**fields)

    def space(self) -> dict[str, Any]:
        """What must stay the same across the runs and processes of one study."""
        return {
            "architectures": [a.name for a in self.architectures],
            "teacher": self.teacher is not None,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "image_size": self.image_size,
            "lr_range": list(self.lr_range),
            "distill_weight_range": list(self.distill_weight_range),
            "seed": self.seed,
        }


def _is_rdb(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "oracle", "mssql")


def check_storage(url: str, heartbeat_s: int = 20) -> None:
    """Open the study's storage once (connect, create Optuna's tables), so that a wrong `--storage` is a one-line
    error before the latency table is measured, not after it."""
    import optuna

    storage = open_storage(url, heartbeat_s)
    try:
        optuna.storages.get_storage(storage).get_all_studies()
    except Exception as exc:  # drivers and Optuna raise their own error types
        raise _storage_error(url, exc) from None


def shown_url(url: str) -> str:
    """A storage URL as it may be printed: its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: nothing in it is known to be a password
        return url


def _storage_error(url: str, exc: BaseException) -> SearchError:
    first = (str(exc).strip().splitlines() or [""])[0].strip()
    return SearchError(f"--storage {shown_url(url)}: cannot open the study ({type(exc).__name__}: {first[:200]})")


def open_storage(url: str, heartbeat_s: int) -> Any:
    """An RDB URL becomes Optuna's RDBStorage with a heartbeat and the retry of stale trials (a connection failure:
    a one-line `SearchError`); any other storage string (a journal, a gRPC proxy) goes to Optuna as it is."""
    import optuna

    if not _is_rdb(url):
        return url
    sqlite = url.startswith("sqlite")
    # SQLite: the driver's own transaction handling off (isolation_level None), so that `_serialise` can begin each
    # transaction itself
    engine = {"connect_args": {"timeout": 120, "isolation_level": None}} if sqlite else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat, stable since 2.8
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat_s,
                grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=_retry(),
            )
    except Exception as exc:  # drivers and SQLAlchemy raise their own error types
        raise _storage_error(url, exc) from None
    if sqlite:
        _serialise(storage.engine)
    return storage


def _serialise(engine: Any) -> None:
    """Every transaction on a SQLite study takes the write lock when it begins (BEGIN IMMEDIATE).

    Optuna hands a queued trial to one worker by reading it as WAITING and writing it RUNNING in one transaction,
    with SELECT ... FOR UPDATE, which SQLite ignores; and Python's sqlite3 driver begins a transaction only at the
    first write, so two workers could both read WAITING and both take the trial (the first worker to finish it
    wins, the other's result is refused: "Cannot tell a COMPLETE trial"). Beginning with the write lock makes
    the read and the write one step; the busy timeout makes the other worker wait its turn."""
    from sqlalchemy import event

    @event.listens_for(engine, "begin")
    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections the storage opened before: the next ones begin as above


def _retry() -> Any:
    """Optuna's callback that queues a stale trial again with its parameters (at most twice)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)


# The module a worker process runs (`python -m WORKER_MODULE SPEC INDEX`).
WORKER_MODULE = "unet_edge.search.worker"


def pruner(epochs: int) -> Any:
    """The median pruner, from the middle of a trial's epochs on: a small student can sit on the predict-the-
    background plateau for a third of its schedule and then climb as high as any (benchmarks/README.md, "Students
    and the schedule"), so a trial below the median at its first epochs is not hopeless. Without that warm-up, 8
    of 10 trials of a search on the digits set were pruned after one or two epochs."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, epochs // 2))


def default_trials(spec: StudySpec) -> list[dict[str, Any]]:
    """The trials a new study starts from: what `unet-edge train` runs by default, narrowed to the budget. Its
    architecture is `start_architecture`'s, its learning rate the one `train` picks for that width, distilled with
    `train`'s default weight when there is a teacher, and alone. The sampler then explores from there, so a search
    never ends below `train`'s own settings on the model a user would shrink `train`'s default to."""
    from ..config import TrainConfig, width_lr

    arch = start_architecture(spec.architectures, spec.latency_ms)
    low, high = spec.lr_range
    lr = min(max(width_lr(arch.base_channels), low), high)
    base: dict[str, Any] = {"architecture": arch.name, "lr": lr}
    if spec.teacher is None:
        return [base]
    low_w, high_w = spec.distill_weight_range
    weight = min(max(TrainConfig().distill_weight, low_w), high_w)
    return [{**base, "distill": True, "distill_weight": weight}, {**base, "distill": False}]


def start_architecture(feasible: tuple[Architecture, ...], latency_ms: dict[str, float]) -> Architecture:
    """`train`'s default model narrowed to the budget: among the `feasible` architectures, those of its depth where
    any fits, the widest of them; between equal widths its up-sampling and block order, then the slowest.

    Not simply the slowest: an up-sampling mode or a shallow, wide model can cost more time on a runtime than it adds
    capacity (digits, 11 classes: a base-6 depth-2 bilinear model was slower than the base-8 depth-3 one).
    """
    from ..config import TrainConfig

    default = TrainConfig().model
    return max(
        feasible,
        key=lambda a: (
            a.depth == default.depth,
            a.base_channels,
            a.upsample == default.upsample,
            a.block_order == default.block_order,
            latency_ms[a.name],
            a.name,
        ),
    )


def enqueue_defaults(study: Any, spec: StudySpec) -> None:
    """Queue `default_trials` on a study that has no trial yet (a resumed study keeps what it has)."""
    if study.get_trials(deepcopy=False):
        return
    for params in default_trials(spec):
        study.enqueue_trial(params, user_attrs={"start": "train's defaults"})


def open_study(spec: StudySpec, worker: int = 0) -> Any:
    """The study (created on first use), its sampler seeded by the seed, the worker and the trials already there,
    so two workers, or a resumed run, do not replay the same random start."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a trial's failure is in its attributes
    storage = open_storage(spec.storage, spec.heartbeat_s)
    study = optuna.create_study(
        storage=storage,
        study_name=spec.study_name,
        direction="maximize",
        load_if_exists=True,
        pruner=pruner(spec.epochs),
    )
    space = spec.space()
    saved = study.user_attrs.get(SPACE_ATTR)
    if saved is None:
        study.set_user_attr(SPACE_ATTR, space)
    elif saved != space:
        changed = [k for k in space if saved.get(k) != space[k]]
        raise SearchError(
            f"study {spec.study_name!r} in {spec.storage} was started with other settings ({', '.join(changed)}: "
            f"{saved.get(changed[0])} then, {space[changed[0]]} now); give another --name or the same settings"
        )
    seed = spec.seed * 1000 + 97 * worker + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    return study


def counted_trials(study: Any, before: int | None = None) -> int:
    """Trials that use up `--trials`: finished, pruned or running (a failed one does not), of a lower number than
    `before` when given."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    trials = study.get_trials(deepcopy=False, states=states)
    return sum(1 for t in trials if before is None or t.number < before)


def recover_stale_trials(study: Any) -> int:
    """Fail every RUNNING trial of a study no process works on (the caller holds the study's lock) and queue each
    again with its parameters; returns how many."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    retry = _retry()
    for trial in stale:
        retry(study, study.tell(trial.number, state=TrialState.FAIL))
    return len(stale)


class _TrialLimit(Exception):
    """The study already has its `--trials`: this trial does not train."""


class _Objective:
    def __init__(self, spec: StudySpec) -> None:
        self.spec = spec
        self.by_name = {a.name: a for a in spec.architectures}

    def __call__(self, trial: Any) -> float:
        import optuna

        spec = self.spec
        if counted_trials(trial.study, before=trial.number) >= spec.trials:
            trial.set_user_attr("skipped", f"the study already has its {spec.trials} trials")
            trial.study.stop()
            raise _TrialLimit
        arch = self.by_name[trial.suggest_categorical("architecture", list(self.by_name))]
        lr = trial.suggest_float("lr", *spec.lr_range, log=True)
        distill = spec.teacher is not None and trial.suggest_categorical("distill", [True, False])
        weight = trial.suggest_float("distill_weight", *spec.distill_weight_range, log=True) if distill else 0.0
        trial.set_user_attr("latency_ms", spec.latency_ms[arch.name])
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        same = _same_params(trial)
        if same is not None:
            trial.set_user_attr("same_as", same.number)
            for key in ("run_dir", "best_epoch"):
                if key in same.user_attrs:
                    trial.set_user_attr(key, same.user_attrs[key])
            return float(same.value)
        return _train(trial, spec, arch, lr, weight if distill else None, optuna.TrialPruned)


def _same_params(trial: Any) -> Any:
    """A finished trial with exactly these parameters (its result is this one's: nothing is trained twice)."""
    from optuna.trial import TrialState

    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.params == trial.params and "same_as" not in other.user_attrs:
            return other
    return None


def _train(trial: Any, spec: StudySpec, arch: Architecture, lr: float, weight: float | None, pruned: type) -> float:
    from ..config import TrainConfig
    from ..train import TrainHooks, fit

    class Report(TrainHooks):
        """Val mIoU to the pruner after each epoch; a hopeless trial, or one past --timeout, stops there."""

        def on_start(self, run_dir: Path, epochs: int, steps: int, start_epoch: int, device: str) -> None:
            trial.set_user_attr("run_dir", str(run_dir))

        def on_epoch_end(self, record: dict[str, Any]) -> None:
            miou = record.get("miou")
            miou = 0.0 if miou is None or not math.isfinite(miou) else float(miou)
            trial.report(miou, record["epoch"])
            if trial.should_prune():
                raise pruned(f"val mIoU {miou:.4f} at epoch {record['epoch']} is below the other trials' median")
            if spec.deadline is not None and time.time() > spec.deadline and record["epoch"] < spec.epochs:
                trial.set_user_attr("stopped", "--timeout")
                raise pruned(f"--timeout reached at epoch {record['epoch']}")

    config = TrainConfig(
        data=spec.data,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        lr=lr,
        image_size=spec.image_size,
        teacher=spec.teacher if weight is not None else None,
        distill_weight=weight if weight is not None else TrainConfig().distill_weight,
        model=arch.model_config(),
        device=spec.device,
        workers=0,
        seed=spec.seed,
        out=spec.trials_dir,
        name=f"{trial.number:03d}",
    )
    try:
        result = fit(config, Report())
    except TrainingError as exc:
        trial.set_user_attr("failed", str(exc))
        raise
    trial.set_user_attr("best_epoch", result.best_epoch)
    return float(result.best_miou)


def optimize(spec: StudySpec, worker: int = 0) -> None:
    """One worker: open the study and let Optuna run trials until `--trials` are counted or the deadline."""
    import optuna
    import torch

    torch.set_num_threads(spec.threads)
    study = open_study(spec, worker)
    if counted_trials(study) >= spec.trials:
        return
    timeout = None if spec.deadline is None else spec.deadline - time.time()
    if timeout is not None and timeout <= 0:
        return
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    study.optimize(
        _Objective(spec),
        timeout=timeout,
        catch=(_TrialLimit, TrainingError),
        callbacks=[optuna.study.MaxTrialsCallback(spec.trials, states=states)],
    )


def run_workers(spec: StudySpec, workers: int, spec_file: Path) -> None:
    """`workers` processes on the study (this one alone when 1), each calling `study.optimize`: started as
    `python -m unet_edge.search.worker SPEC INDEX`, so they need nothing of the caller's `__main__`."""
    if workers <= 1:
        optimize(spec)
        return
    import subprocess

    atomic_write_text(spec_file, json.dumps(spec.to_json(), indent=1) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads)}
    command = [sys.executable, "-m", WORKER_MODULE, str(spec_file)]
    processes = [subprocess.Popen([*command, str(index)], env=env) for index in range(workers)]
    try:
        codes = [process.wait() for process in processes]
    except BaseException:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()
        raise
    failed = [(index, code) for index, code in enumerate(codes) if code != 0]
    if failed:
        raise SearchError(f"search worker {failed[0][0]} exited with code {failed[0][1]} (rerun to resume the study)")
