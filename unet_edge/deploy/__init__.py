"""Deploy: the fastest artifact that keeps the accuracy, chosen by measurement on this machine.

Every checkpoint given x every installed format of the registry x each precision the format offers and this
CPU computes natively is a candidate (a checkpoint whose own val mIoU is already over the budget below the
reference's is not exported: its candidates cannot win). Each checkpoint is loaded once, and its accuracy
budget (the validation set and its own predictions) built once, for all its formats; each format maps the
deploy target (size, batch, longest side, calibration method) onto its own export options. Each candidate is
measured on the whole validation set against the reference checkpoint (the most accurate one given): val mIoU,
its drop and pixel agreement; those within the mIoU budget are then timed with bench's one protocol
(interleaved, same threads, warm-up excluded, at least `min_calls` timed calls, at the deploy size and batch;
a second figure from uint8 images through preprocessing and the argmax, as an application pays).
The decision (`decide`) is a pure function of the records.

The package by job: `records` (the typed, frozen records), `plan` (what competes), `measure` (checkpoints,
exports, accuracy), `parallel` (the exports in worker processes, one per core, all finished before timing),
`timing`, `decide` (the verdicts, the front, the winner), `cache` (finished work by
content, so a rerun after Ctrl-C or kill -9 does only what is missing) and `report` (deploy.json,
deploy.png, the winner copied out); `run_deploy` here calls them in order. No module here names a format.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..formats import DeployTarget, available_cores, default_threads, export_formats
from ..io import check_writable
from ..progress import Progress, Steps, tell
from . import measure, parallel, timing
from .cache import CACHE_FILE, DeployCache, content_key
from .decide import Decision, Verdict, checkpoint_over_budget, decide, pareto_front, verdict
from .plan import Plan, plan_candidates
from .records import (
    Baseline,
    Candidate,
    DeployError,
    DeployOptions,
    Machine,
    Reference,
    Settings,
    Skipped,
)
from .report import REPORT_FILE, DeployResult, write_outputs

__all__ = [
    "CACHE_FILE",
    "Baseline",
    "Candidate",
    "Decision",
    "DeployCache",
    "DeployError",
    "DeployOptions",
    "DeployResult",
    "Machine",
    "Plan",
    "Reference",
    "Settings",
    "Skipped",
    "Verdict",
    "content_key",
    "decide",
    "pareto_front",
    "plan_candidates",
    "run_deploy",
    "verdict",
]


def run_deploy(options: DeployOptions, progress: Progress | None = None) -> DeployResult:
    """Export, measure and time every candidate (what the cache holds is not done again), decide, and
    write deploy.json, deploy.png and the winner into `options.out`. Nothing passing is not an error
    here: the result's decision has no winner (`Decision.require_winner` raises). PyTorch's thread
    count, which the runtimes set while measuring, is restored at the end."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _deploy(options, progress)
    finally:
        torch.set_num_threads(threads)


def _deploy(options: DeployOptions, progress: Progress | None) -> DeployResult:
    from ..evaluate import checkpoint_data_root

    out = Path(options.out)
    check_writable(out / REPORT_FILE)
    threads = options.threads or default_threads()
    plan = plan_candidates(options.formats, options.precisions)
    if not plan.formats:
        why = "; ".join(f"{s.format} {s.precision or ''}: {s.reason}".replace("  ", " ") for s in plan.skipped)
        raise DeployError(f"{out}: nothing to deploy ({why or 'no format offers the precisions asked for'})")
    tell(progress, 0, None, "loading checkpoints")
    checkpoints = measure.load_checkpoints(options)
    root = checkpoint_data_root(checkpoints[0].loaded.state, options.data)
    validation = measure.Validation(root, threads)
    cache = DeployCache(out / CACHE_FILE)
    count = len(checkpoints) * plan.pairs
    steps = Steps(progress, total=len(checkpoints) + 3 * count)  # per candidate: export, accuracy, timing

    checkpoints = measure.measure_checkpoints(checkpoints, validation, cache, steps.part(len(checkpoints)))
    steps.advance(len(checkpoints))
    reference, reference_record = measure.choose_reference(checkpoints, options)
    candidates = _export_and_measure(checkpoints, reference, plan, options, validation, cache, steps)

    shortlist = [c for c in candidates if verdict(c, options.max_miou_drop) is None]
    timed, baseline = timing.time_candidates(shortlist, reference, options, threads, cache, steps.part(count))
    steps.advance(count, "deciding")
    by_key = {c.key: c for c in timed}
    candidates = [by_key.get(c.key, c) for c in candidates]
    settings = Settings(
        checkpoints=tuple(str(c.path) for c in checkpoints),
        max_miou_drop=options.max_miou_drop,
        max_latency_ms=options.max_latency_ms,
        image_size=options.image_size,
        anchor_ms=options.anchor_ms,
        batch_size=options.batch_size,
        threads=threads,
        seconds=options.seconds,
        min_calls=options.min_calls,
        warmup=options.warmup,
        rounds=options.rounds,
        data=str(root),
        validation_images=len(validation.images(reference.loaded.mean, reference.loaded.std).raw),
        timing=timing.PROTOCOL,
    )
    result = write_outputs(
        DeployResult(
            candidates,
            decide(candidates, options.max_miou_drop, options.max_latency_ms),
            reference_record,
            baseline,
            plan.skipped,
            _machine(threads),
            settings,
            out,
            out / REPORT_FILE,
        )
    )
    steps.done()
    return result


def _export_and_measure(
    checkpoints: list[measure.Checkpoint],
    reference: measure.Checkpoint,
    plan: Plan,
    options: DeployOptions,
    validation: measure.Validation,
    cache: DeployCache,
    steps: Steps,
) -> list[Candidate]:
    """Each checkpoint's formats exported and each candidate measured against the reference, both cached, so Ctrl-C
    loses at most the exports under way; a checkpoint already over the budget is not exported. With more than one
    job, the (checkpoint, format) exports run in worker processes (`parallel`), all finished before anything is
    timed; with one, here, one after another (one load and one budget per checkpoint, shared by its formats)."""
    val = validation.images(reference.loaded.mean, reference.loaded.std)
    target = DeployTarget(
        image_size=options.image_size,
        batch_size=options.batch_size,
        max_side=max([*options.image_size, *(max(image.shape[:2]) for image in val.raw)]),
        calibration=options.calibration,
    )
    formats = tuple(name for name, _ in plan.formats)
    # checkpoint-major, the order of the report; each with the budget it has left
    work = [
        measure.ExportJob(
            checkpoint, name, precisions, measure.budget_left(checkpoint, reference, options.max_miou_drop), target
        )
        for checkpoint in checkpoints
        for name, precisions in plan.formats
    ]
    results: dict[int, list[Candidate]] = {}
    for i, job in enumerate(work):  # a checkpoint over the budget cannot win
        reason = checkpoint_over_budget(job.checkpoint.miou, reference.miou, options.max_miou_drop)
        if reason is not None:
            results[i] = measure.unexported(job.checkpoint, job.format, job.precisions, reason)
            steps.advance(2 * len(job.precisions))
    # what the cache holds in full is read here, below; the rest may go to the workers
    left = [
        i
        for i, job in enumerate(work)
        if i not in results and not measure.finished(job, validation.root, options, reference, cache)
    ]
    jobs = min(options.jobs or available_cores(), len(left))
    if jobs > 1:
        # The longest exports first (each format's `export_seconds` per precision, the larger model first among
        # equals), so the short ones fill the gaps at the end rather than one long conversion running there alone.
        order = sorted(left, key=lambda i: _export_cost(work[i]), reverse=True)
        tasks = [
            parallel.Task(
                index=i,
                job=replace(work[i], checkpoint=replace(work[i].checkpoint, loaded=None)),
                reference=replace(reference, loaded=None),
                options=options,
                formats=formats,
                root=validation.root,
                masks={c.sha256: validation.outputs(c)[1] for c in (work[i].checkpoint, reference)},
                cache=dict(cache.entries),  # a copy: the pool pickles it later, while finished tasks are put
            )
            for i in order
        ]

        def done(result: parallel.TaskResult) -> None:
            for key, value in result.added.items():
                cache.put(key, value)
            results[result.index] = result.candidates
            steps.advance(2 * len(work[result.index].precisions))

        steps.say(f"exporting in {jobs} processes: {', '.join(t.label for t in tasks[:jobs])}")
        # a task whose worker died has no result: it is done again here, below
        parallel.run_tasks(tasks, jobs, done, lambda label: steps.label(f"exporting: {label}"))
    sources = measure.Sources(options, validation, formats)
    for index, job in enumerate(work):
        if index in results:
            continue
        prefix = f"exporting {job.label} ({', '.join(p.value for p in job.precisions)}): "
        steps.say(prefix.rstrip(": "))
        results[index] = measure.export_and_measure(
            job, sources, validation, reference, cache, steps.part(2 * len(job.precisions), prefix)
        )
        steps.advance(2 * len(job.precisions))
    return [candidate for index in range(len(work)) for candidate in results[index]]


def _export_cost(job: measure.ExportJob) -> tuple[float, int]:
    """A job's rough export time (its format's seconds per precision, times its precisions) and its model's size."""
    seconds = export_formats()[job.format].export_seconds * len(job.precisions)
    return seconds, sum(p.numel() for p in job.checkpoint.loaded.model.parameters())


def _machine(threads: int) -> Machine:
    from ..bench import machine_info

    facts = machine_info(threads)
    return Machine(
        cpu=facts.pop("cpu"),
        cpu_int8_bf16=tuple(facts.pop("cpu_int8_bf16")),
        facts=facts,
        cpu_flags_override=os.environ.get("UNET_EDGE_CPU_FLAGS"),
    )
