"""A search's results from its study: every trial's record (``DIR/search.json``), the Pareto front of
int8 top-1 against latency and size, and the winner copied to ``DIR/best/``: the most accurate int8 model
within budget that passed parity (ties: the faster, then the smaller)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from edgetl.rundir import MANIFEST_NAME, run_lock, write_json

log = logging.getLogger(__name__)

SEARCH_JSON = "search.json"
BEST = "best"
SCHEMA_VERSION = 1
PUBLISH_LOCK = ".publish"
# Optuna's state of a trial with no record of ours: it never got as far as finishing
UNRECORDED = {"RUNNING": "running", "WAITING": "waiting", "FAIL": "failed", "PRUNED": "pruned", "COMPLETE": "complete"}


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial of the study, in trial order."""
    trials = study.get_trials(deepcopy=False)
    rows = []
    for trial in trials:
        record = trial.user_attrs.get("result")
        if record is None:
            status = "interrupted" if trial.user_attrs.get("interrupted") else UNRECORDED[trial.state.name]
            record = {"params": trial.params, "run_dir": trial.user_attrs.get("run_dir"), "status": status}
            folder = trial.user_attrs.get("resume_of", trial.number)
            later = [t.number for t in trials if t.number > trial.number and t.user_attrs.get("resume_of") == folder]
            if trial.state.name == "FAIL" and later:
                record["continued_as"] = later[0]  # its fine-tune went on in that trial
        rows.append({"number": trial.number, **record})
    return rows


def _key(row: dict[str, Any]) -> tuple[float, float, float]:
    return row["int8_top1"], -row["latency"]["ms"], -row["bytes"]


def pareto_front(rows: list[dict[str, Any]]) -> list[int]:
    """Numbers of the trials with an int8 model that passed parity and that no other such trial beats on
    top-1, latency and size at once."""
    measured = [r for r in rows if r.get("parity_passed") and r.get("latency")]

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        ka, kb = _key(a), _key(b)
        return all(x >= y for x, y in zip(ka, kb, strict=True)) and ka != kb

    return [r["number"] for r in measured if not any(dominates(o, r) for o in measured)]


def winner(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    complete = [r for r in rows if r.get("status") == "complete"]
    return max(complete, key=_key) if complete else None


def publish(out: Path, study: Any, settings: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Write search.json, DIR/best/ and report.html from the study as it is now; returns search.json's
    content. Another process of the study publishing at the same moment is waited for."""
    from edgetl.search.page import write_page

    with run_lock(out / PUBLISH_LOCK, "search publish", wait=60):  # not DIR itself: its lock sweeps temporaries below
        rows = trial_rows(study)
        best = winner(rows)
        summary = {"schema_version": SCHEMA_VERSION, "kind": "edgetl-search", **settings,
                   "trials": rows, "pareto": pareto_front(rows),
                   "best": None if best is None else {"number": best["number"], "run_dir": BEST},
                   "seconds_this_process": round(seconds, 1)}  # fmt: skip
        if best is not None:
            _install_best(out, out / best["run_dir"])
        write_json(out / SEARCH_JSON, summary)
        write_page(out, summary)
        return summary


def _install_best(out: Path, source: Path) -> None:
    """Copy the winning trial's run (without checkpoints and bundles) to DIR/best, replacing the old one."""
    best = out / BEST
    kept = best / MANIFEST_NAME
    if kept.is_file() and kept.read_bytes() == (source / MANIFEST_NAME).read_bytes():
        return
    staging = out / f".{BEST}.{os.getpid()}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    skip = shutil.ignore_patterns("checkpoints", "bundles", ".edgetl.lock", "report.html")
    shutil.copytree(source, staging, ignore=skip)
    old = out / f".{BEST}.{os.getpid()}.old"
    if best.exists():
        best.rename(old)
    staging.rename(best)
    shutil.rmtree(old, ignore_errors=True)
    try:
        from edgetl.report import write_report

        write_report(best)
    except Exception as exc:  # noqa: BLE001 - the run stands without its page
        log.warning("report.html of %s not written: %s", best, exc)
    log.info("best: %s -> %s", source.name, best)
