"""One trial of a search: a normal ``edgetl finetune`` in ``DIR/trials/NNN`` (its validation loss
reported after every epoch, so the pruner can stop it), then the normal export with the target's parity
gate, then the int8 model's latency and size judged against the budget.

A trial's record (``result`` in its Optuna user attributes, and in ``search.json``) has a ``status``:
``complete`` (an int8 model within budget that passed parity), ``pruned``, ``over-budget`` (rejected
before training when its shape's cost was known, or after, when the trained model's was over),
``parity-failed``, ``diverged`` or ``failed``. Only complete trials can win.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.config import ExportConfig, FinetuneConfig
from edgetl.errors import ExportError, Interrupted, RunLocked, TrainingDiverged
from edgetl.rundir import run_lock
from edgetl.search.latency import LatencyOn, host_latency, on_board, on_target
from edgetl.search.shapes import Budget, Shapes
from edgetl.search.space import PRETRAINED_WIDTH, Space
from edgetl.targets import Target

log = logging.getLogger(__name__)

INT8 = "model_int8.tflite"
TRIALS = "trials"


@dataclass
class Context:
    """Everything a trial needs, the same for every trial of one process."""

    data: str
    out: Path
    target: Target
    space: Space
    budget: Budget
    shapes: Shapes
    how: LatencyOn
    base: dict[str, Any]  # FinetuneConfig fields every trial shares (epochs, batch size, seed, ...)
    weights: str  # for width 1.0; narrower widths train from scratch
    export: ExportConfig
    deadline: float | None = None  # time.monotonic() by which the search ends (a trial's export included)
    judge_s: float = 0.0  # the longest time from a trial's last epoch to its verdict: kept free before the deadline
    last_epoch_end: float = 0.0  # time.monotonic() at the end of the latest epoch (or the start of a trial)
    epoch_s: float = 0.0  # the longest epoch so far (a trial's first: with its decoding and set-up)

    def room_for_a_trial(self) -> bool:
        """Whether the time budget leaves room for one more epoch and its verdict."""
        return self.deadline is None or time.monotonic() + self.epoch_s + self.judge_s <= self.deadline
    done: list[dict[str, Any]] = field(default_factory=list)  # this process's trial records, in order
    train_images: int = 0
    batch_size: int = 32


def trial_dir(out: Path, number: int) -> Path:
    return out / TRIALS / f"{number:03d}"


class Objective:
    """The function Optuna maximises: the int8 model's validation top-1 (0 for a trial that cannot win)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def __call__(self, trial: Any) -> float:
        import optuna

        ctx = self.ctx
        params = ctx.space.suggest(trial)
        number = trial.user_attrs.get("resume_of", trial.number)
        run_dir = trial_dir(ctx.out, number)
        record: dict[str, Any] = {"params": params, "run_dir": str(run_dir.relative_to(ctx.out))}
        started = time.perf_counter()
        try:
            with run_lock(run_dir, "search trial"):
                # named once held: a process resuming the study takes a named folder nobody holds for a dead trial's
                trial.set_user_attr("run_dir", record["run_dir"])
                cost = ctx.shapes.cost(params["image_size"], params["width"])
                record.update(bytes=cost["bytes"], latency=cost["latency"])
                if cost["over_budget"]:
                    value = self._finish(trial, record, started, "over-budget", "; ".join(cost["over_budget"]))
                else:
                    value = self._run(trial, params, run_dir, record, started)
            if record["status"] == "over-budget":
                _drop_untrained(run_dir)
        except optuna.TrialPruned:
            _drop_untrained(run_dir)
            raise
        except Interrupted:
            trial.set_user_attr("interrupted", True)
            raise
        except TrainingDiverged as exc:
            return self._finish(trial, record, started, "diverged", exc.message)
        except (ExportError, RunLocked) as exc:  # RunLocked: another process works in this trial's folder
            return self._finish(trial, record, started, "failed", exc.message)
        return value

    def _run(self, trial: Any, params: dict[str, Any], run_dir: Path, record: dict[str, Any], started: float) -> float:
        result = self._train(trial, params, run_dir, record, started)
        record.update(val_top1=result.best_val_acc, val_loss=result.best_val_loss, best_epoch=result.best_epoch,
                      epochs=result.epochs_run, train_s=round(result.seconds, 1))  # fmt: skip
        value = self._judge(trial, run_dir, record, started)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # judged: nothing left to resume
        return value

    def _train(self, trial: Any, params: dict[str, Any], run_dir: Path, record: dict[str, Any], started: float):
        """The fine-tune, reporting minus the validation loss after every epoch (the study maximises)."""
        import optuna

        from edgetl.train.checkpoint import STATE_PATH
        from edgetl.train.finetune import finetune

        ctx = self.ctx
        weights = ctx.weights if params["width"] == PRETRAINED_WIDTH else "none"
        cfg = FinetuneConfig.build(ctx.base, params, {"weights": weights})

        def after_epoch(row: dict[str, Any]) -> bool:
            trial.report(-row["val_loss"], row["epoch"])
            if trial.should_prune():
                record.update(val_loss=row["val_loss"], val_top1=row["val_acc"], epochs=row["epoch"])
                self._finish(trial, record, started, "pruned", f"validation loss {row['val_loss']:.4f} after "
                             f"epoch {row['epoch']} is behind the other trials'")  # fmt: skip
                raise optuna.TrialPruned(record["reason"])
            now = time.monotonic()
            ctx.epoch_s, ctx.last_epoch_end = max(ctx.epoch_s, now - ctx.last_epoch_end), now
            if ctx.deadline is not None and ctx.last_epoch_end + ctx.judge_s > ctx.deadline:
                record["stopped_by_time_budget"] = row["epoch"]
                return True
            return False

        resume = (run_dir / STATE_PATH).is_file()  # an interrupted trial, continued (or re-judged)
        ctx.last_epoch_end = time.monotonic()
        return finetune(ctx.data, run_dir, cfg, resume=resume, on_epoch=after_epoch)

    def _judge(self, trial: Any, run_dir: Path, record: dict[str, Any], started: float) -> float:
        """Export with the parity gate; the trained int8 model's latency and size against the budget."""
        from edgetl.pipeline import export_and_check

        ctx = self.ctx
        report = export_and_check(run_dir, ctx.export)
        int8 = report.parity.artifacts[INT8]
        record.update(int8_top1=int8["top1"], agreement=int8["agreement"], parity_passed=bool(int8["passed"]),
                      bytes=(run_dir / INT8).stat().st_size)  # fmt: skip
        host = host_latency(run_dir / INT8)
        record["latency"] = on_target(host, ctx.how)
        record["judge_s"] = round(time.monotonic() - ctx.last_epoch_end, 1)  # the run's outputs, export, parity
        ctx.judge_s = max(ctx.judge_s, record["judge_s"])
        if not int8["passed"]:
            return self._finish(trial, record, started, "parity-failed",
                                f"int8 top-1 Δ {int8['delta_top1_pp']:+.2f} pp, agreement {int8['agreement']:.2%}")
        if ctx.how.kind == "ssh":
            record["latency"] = on_board(self._bundle(run_dir), ctx.how, host)
        over = ctx.budget.problems(record)
        if over:
            return self._finish(trial, record, started, "over-budget", "; ".join(over))
        return self._finish(trial, record, started, "complete", "", value=int8["top1"])

    def _bundle(self, run_dir: Path) -> Path:
        from edgetl.package.bundle import package

        return package(run_dir, self.ctx.target, run_dir / "bundles").bundle_dir

    def _finish(self, trial: Any, record: dict[str, Any], started: float, status: str, reason: str,
                value: float = 0.0) -> float:  # fmt: skip
        record.update(status=status, reason=reason, seconds=round(time.perf_counter() - started, 1))
        trial.set_user_attr("result", record)
        self.ctx.done.append({"number": trial.number, **record})
        log.info("%s", trial_line(trial.number, record))
        return value


def _drop_untrained(run_dir: Path) -> None:
    """Remove the folder of a trial that kept no model (rejected or pruned: a pruned trial never resumes)."""
    if not (run_dir / "model.pt").exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def trial_line(number: int, record: dict[str, Any]) -> str:
    """One progress line: the trial's choices, what it measured and its status."""
    p = record["params"]
    choice = (f"{p['image_size']} px w{p['width']:g} {p['strategy']} lr {p['lr']:.2g} "
              f"ls {p['label_smoothing']:.2f}")  # fmt: skip
    facts = []
    if record.get("int8_top1") is not None:
        facts.append(f"int8 {record['int8_top1']:.1%}")
    elif record.get("val_top1") is not None:
        facts.append(f"val {record['val_top1']:.1%} (float, epoch {record.get('epochs')})")
    if record.get("latency"):
        facts.append(f"{record['latency']['ms']:.3g} ms")
    if record.get("bytes"):
        facts.append(f"{record['bytes'] / 1000:,.0f} kB")
    why = f" ({record['reason']})" if record.get("reason") else ""
    return f"trial {number}: {choice} | {', '.join(facts) or '-'} | {record['status']}{why} [{record['seconds']:.0f} s]"
