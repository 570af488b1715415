"""The search itself: an Optuna study (TPE sampler, Hyperband pruner on validation loss) stored in
``DIR/study.journal``, or in any storage Optuna takes (``--storage``), so that an interrupted search
continues with ``--resume`` and several processes, on one machine or many, work on one study.

The study's settings (data, target, budget, space, recipe) are fixed when it is created: a process that
joins or resumes it searches the same thing.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgetl.config import ExportConfig, FinetuneConfig, export_config
from edgetl.errors import SIGINT_SEEN, ConfigError, ExitCode, Interrupted, RunDirError, RunLocked, first_line
from edgetl.rundir import run_lock
from edgetl.search.latency import LatencyOn
from edgetl.search.results import publish, trial_rows
from edgetl.search.shapes import Budget, Shapes
from edgetl.search.space import Space, first_trial
from edgetl.search.trial import Context, Objective, trial_dir
from edgetl.targets import Target

log = logging.getLogger(__name__)

JOURNAL = "study.journal"
REQUEUE_LOCK = ".resume"
STUDY_NAME = "edgetl-search"


@dataclass
class SearchResult:
    out: Path
    summary: dict[str, Any]
    ran: list[dict[str, Any]] = field(default_factory=list)  # this process's trials

    @property
    def best(self) -> dict[str, Any] | None:
        best = self.summary.get("best")
        if best is None:
            return None
        return next(r for r in self.summary["trials"] if r["number"] == best["number"])

    @property
    def running_elsewhere(self) -> int:
        """Trials of the study other processes were still running when this one finished."""
        return sum(r["status"] == "running" for r in self.summary["trials"])

    @property
    def exit_code(self) -> ExitCode:
        """4 when the study has no winner and no trial left under way that could still give one."""
        return ExitCode.OK if self.best is not None or self.running_elsewhere else ExitCode.CONSTRAINT_VIOLATED

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "best": self.best, "best_dir": str(self.out / "best") if self.best else None,
                "pareto": self.summary["pareto"], "trials": len(self.summary["trials"]),
                "trials_this_process": len(self.ran), "running_elsewhere": self.running_elsewhere,
                "search_json": str(self.out / "search.json"),
                "report": str(self.out / "report.html")}  # fmt: skip


def storage_for(out: Path, url: str | None) -> Any:
    """The study's storage: a journal file in DIR (local processes share it through file locks), or the
    database at ``url`` (``sqlite:///...``, ``postgresql://...``: processes on several machines)."""
    if url:
        from optuna.storages import RDBStorage

        try:
            return RDBStorage(url)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's and the driver's errors have no common base
            raise ConfigError(f"--storage {url}: {first_line(exc)}",
                              hint="an Optuna storage URL: sqlite:///path.db, postgresql://..., mysql://...") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    out.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(out / JOURNAL)))


def study_settings(out: Path, storage: Any, resume: bool, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings the search runs with: ``settings`` for a new study (refusing to overwrite one), the
    stored ones with ``resume`` (which must be of the same data and target)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is edgetl's error line, once
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if STUDY_NAME in names and not resume:
        raise RunDirError(f"{out} already holds a search", hint="add --resume to continue it (or to join it from "
                          "another process), or choose another --out")  # fmt: skip
    if not resume:
        return settings
    if STUDY_NAME not in names:
        raise RunDirError(f"there is no search to resume in {out}", hint="start one without --resume")
    stored = optuna.load_study(study_name=STUDY_NAME, storage=storage).user_attrs.get("settings")
    if not isinstance(stored, dict):
        raise RunDirError(f"the search in {out} has no settings (not made by edgetl search?)")
    for key in ("data", "target"):
        if stored[key] != settings[key]:
            raise ConfigError(f"the search in {out} was started with {key} {stored[key]}, not {settings[key]}",
                              hint="resume it with the same DATA and --target")  # fmt: skip
    return stored


def open_study(storage: Any, settings: dict[str, Any], resume: bool) -> Any:
    """The study: TPE sampling, Hyperband pruning on the epochs of a trial; created with its settings, or
    loaded (``resume``)."""
    import optuna

    recipe = FinetuneConfig.build(settings["recipe"])
    # a joining process samples with its own seed: two processes with one seed would propose the same trials
    seed = recipe.seed + (os.getpid() if resume else 0)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=recipe.head_epochs + recipe.finetune_epochs,
                                            reduction_factor=3)  # fmt: skip
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize", sampler=sampler,
                                pruner=pruner, load_if_exists=resume)  # fmt: skip
    if not resume:
        study.set_user_attr("settings", settings)
    return study


def requeue_unfinished(study: Any, out: Path) -> list[int]:
    """Queue again the trials an interrupted or killed process left: their fine-tune continues from its
    last epoch. A running trial whose folder nobody holds belonged to a process that died."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get("resume_of") for t in trials if t.state != TrialState.FAIL}
    again = []
    for trial in trials:
        if trial.state == TrialState.RUNNING and _dead(trial, out):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        elif trial.state != TrialState.FAIL or "result" in trial.user_attrs:
            continue
        number = trial.user_attrs.get("resume_of", trial.number)
        if number in queued or not (trial_dir(out, number)).exists():
            continue
        study.enqueue_trial(trial.params, user_attrs={"resume_of": number}, skip_if_exists=False)
        queued.add(number)
        again.append(number)
    return again


def _requeue_once(study: Any, out: Path) -> list[int]:
    """:func:`requeue_unfinished` by one process at a time: two processes resuming together would both
    queue the same interrupted trial."""
    with run_lock(out / REQUEUE_LOCK, "search resume", wait=60):
        return requeue_unfinished(study, out)


def _dead(trial: Any, out: Path) -> bool:
    """Whether a running trial's process is gone: a trial names its folder once it holds the folder's lock,
    so a named folder nobody holds is a dead process's; one that never named it is dead after an hour."""
    import datetime

    folder = trial.user_attrs.get("run_dir")
    if folder is None:
        started = trial.datetime_start or datetime.datetime.now()
        return datetime.datetime.now() - started > datetime.timedelta(hours=1)
    return not _held(out / folder)


def _held(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    try:
        with run_lock(folder, "search check"):
            return False
    except RunLocked:
        return True


def epoch_seconds(space: Space, classes: int, images: int, batch: int) -> float:
    """A lower bound of one epoch's time on this machine: the cheapest shape's forward passes over the
    training images (a head-phase epoch; the backbone is frozen, its backward pass skipped)."""
    import torch

    from edgetl.train.model import EdgeClassifier

    size, width = space.sizes[0], space.widths[-1]
    model = EdgeClassifier(classes, width).eval()
    pixels = torch.rand(min(batch, images), 3, size, size)
    with torch.inference_mode():
        model(pixels)
        started = time.perf_counter()
        model(pixels)
        per_batch = time.perf_counter() - started
    return per_batch * math.ceil(images / len(pixels))


def search(data: str, out: str | os.PathLike, target: Target, space: Space, budget: Budget, how: LatencyOn, *,
           trials: int, minutes: float | None, recipe: dict[str, Any], weights: str, resume: bool = False,
           storage_url: str | None = None, progress: bool = False,
           started: float | None = None) -> SearchResult:  # fmt: skip
    """Run (or continue, or join) the search until the study has ``trials`` trials or ``minutes`` pass;
    publish its results. See :mod:`edgetl.search`. With ``resume`` the study's stored settings are used
    (``space``, ``budget``, ``how``, ``recipe`` and ``weights`` are the new study's only).

    Raises:
        ConfigError: a time budget shorter than one epoch; RunDirError: DIR holds another search (or none
        to resume); ConstraintViolated: no shape is within budget; DataError; Interrupted (Ctrl-C: the
        results so far are published, ``--resume`` continues).
    """
    out = Path(out)
    started = time.monotonic() if started is None else started  # the command's start: its imports count too
    settings = {"data": str(Path(data).resolve()), "target": target.name, "budget": budget.to_dict(),
                "latency_on": how.to_dict(), "space": space.to_dict(), "recipe": recipe,
                "weights": weights}  # fmt: skip
    storage = storage_for(out, storage_url)
    settings = study_settings(out, storage, resume, settings)
    ctx = _context(data, out, target, settings)
    if minutes is not None:  # bad input is refused before the study exists
        _refuse_short_budget(minutes, ctx)
        ctx.deadline = started + minutes * 60
    fits = ctx.shapes.within_budget(ctx.space.sizes, ctx.space.widths)
    ctx.space = ctx.space.narrowed(fits)
    study = open_study(storage, settings, resume)
    if not resume:
        study.enqueue_trial(first_trial(fits))
    elif again := _requeue_once(study, out):
        log.info("continuing interrupted trial(s) %s", ", ".join(map(str, again)))

    def published(*_: Any) -> dict[str, Any]:  # search.json, report.html and best/, after every trial
        return publish(out, study, settings, time.monotonic() - started)

    try:
        _optimize(study, ctx, trials, published, progress)
    except (Interrupted, KeyboardInterrupt):
        SIGINT_SEEN[0] = False  # handled here: the results so far are still published
        published()
        hint = f"continue with: edgetl search {data} --out {out} --target {target.name} --resume"
        raise Interrupted(f"search interrupted; {len(trial_rows(study))} trial(s) are recorded in {out}",
                          hint=hint) from None
    return SearchResult(out, published(), ctx.done)


def _optimize(study: Any, ctx: Context, trials: int, after_trial: Any, progress: bool) -> None:
    """Trials until the study has ``trials`` (counting every process's) or the time budget is spent;
    ``progress``: Optuna's bar on stderr."""
    import optuna

    left = trials - len(study.get_trials(deepcopy=False, states=_counted()))
    if left <= 0:
        return
    timeout = None if ctx.deadline is None else ctx.deadline - time.monotonic()
    if timeout is not None and timeout <= 0:
        log.warning("the time budget was spent before a trial could start (probing the shapes)")
        return
    enough = optuna.study.MaxTrialsCallback(trials, states=_counted())

    def in_time(study: Any, _: Any) -> None:  # no trial starts that could not finish an epoch in time
        if not ctx.room_for_a_trial():
            study.stop()

    study.optimize(Objective(ctx), n_trials=left, timeout=timeout, callbacks=[enough, after_trial, in_time],
                   show_progress_bar=progress)  # fmt: skip


def _counted() -> tuple[Any, ...]:
    """The trials that count towards --trials: finished ones and those under way (not failed ones that a
    resumed search runs again)."""
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def _context(data: str, out: Path, target: Target, settings: dict[str, Any]) -> Context:
    """A trial's context from the study's settings."""
    from edgetl.data.folders import discover

    recipe = FinetuneConfig.build(settings["recipe"])
    splits = discover(data, recipe.val_fraction, recipe.seed)
    space = Space(**{k: tuple(v) for k, v in settings["space"].items()})
    budget = Budget(**settings["budget"])
    how = LatencyOn(**{k: v for k, v in settings["latency_on"].items() if k != "how"})
    ctx = Context(data, out, target, space, budget, Shapes(out, splits.classes, how, budget), how,
                  settings["recipe"], settings["weights"],
                  trial_export(target))  # fmt: skip
    ctx.train_images, ctx.batch_size = splits.counts()["train"], recipe.batch_size
    return ctx


def trial_export(target: Target) -> ExportConfig:
    """A trial's export: the target's parity gate, without the remedies ``edgetl export`` tries on a failing
    int8 model (minutes each: a search moves on to other trials; ``edgetl export`` of a trial runs them)."""
    return replace(export_config(target, int8=True, max_drop=None, min_agreement=None), remedies=False)


def _refuse_short_budget(minutes: float, ctx: Context) -> None:
    need = epoch_seconds(ctx.space, len(ctx.shapes.classes), ctx.train_images, ctx.batch_size)
    if minutes * 60 < need:
        raise ConfigError(f"--time-budget {minutes:g} min is shorter than one epoch of the cheapest candidate "
                          f"(at least {need:.0f} s for {ctx.train_images} training images at {ctx.space.sizes[0]} "
                          f"px, width {ctx.space.widths[-1]:g}, on this machine)",
                          hint="give the search more time, or fewer images")  # fmt: skip
