"""Accuracy parity: every exported artifact against the float PyTorch model, on held-out images.

All models see the same uint8 crops from :func:`edgetl.runtime.preprocess.prepare` (the device's
code). Per artifact (:func:`edgetl.check.metrics.compare`): top-1, Δtop-1 vs float, top-1 agreement
with float, logit cosine and SQNR, per-class accuracy Δ and the worst classes. An artifact passes when
its top-1 drop is at most ``max_drop`` percentage points and its agreement at least ``min_agreement``.
The verdict records the evidence it stands on (which images, how many, their digest, the thresholds),
so that ``package`` can judge whether it is enough to ship on.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import charts
from edgetl.check.metrics import ParityReport, compare
from edgetl.check.report_md import parity_markdown
from edgetl.check.runners import runner_for
from edgetl.config import Thresholds
from edgetl.data.heldout import Evaluation
from edgetl.errors import RunDirError
from edgetl.rundir import (
    ARTIFACTS,
    MODEL,
    QAT_WEIGHTS,
    atomic_write,
    read_manifest,
    run_lock,
    update_manifest,
    verify_files,
    write_json,
)

log = logging.getLogger(__name__)



def weaker_evidence(evidence: dict[str, Any], reference: dict[str, Any] | None) -> list[str]:
    """How the evidence of a verdict (``{"data": ..., "thresholds": ...}``) falls short of the export's
    own check (``reference``): fewer images or looser thresholds. Empty: at least as strong."""
    if not reference:
        return []
    reasons = []
    count, ref_count = evidence["data"].get("count", 0), reference["data"].get("count", 0)
    if count < ref_count:
        reasons.append(f"checked on {count} images, the export's own check on {ref_count}")
    mine, ref = evidence["thresholds"], reference["thresholds"]
    if mine["max_drop"] > ref["max_drop"] or mine["min_agreement"] < ref["min_agreement"]:
        reasons.append(f"thresholds (drop <= {mine['max_drop']} pp, agreement >= {mine['min_agreement']}) are looser "
                       f"than the export's ({ref['max_drop']} pp, {ref['min_agreement']})")  # fmt: skip
    return reasons


def check(
    run_dir: str | os.PathLike,
    thresholds: Thresholds = Thresholds(),  # noqa: B008 - frozen, immutable
    data: str | os.PathLike | None = None,
    artifacts: list[str] | None = None,
    evaluation: Evaluation | None = None,
) -> ParityReport:
    """Measure every exported artifact in ``run_dir`` against the float model, holding the run's lock.

    Writes ``parity.json``, ``parity.md`` and ``parity.png`` and records the verdicts in the
    manifest (stage ``check``), where ``package`` reads them. ``evaluation``: what
    :func:`edgetl.data.heldout.evaluation_set` returned for ``data`` (images, description, classes)
    and the float model's logits on those images, when the caller (the export) has them already.

    Raises:
        RunDirError: nothing exported, or an artifact differs from its manifest hash.
        RunLocked: another process writes the run.
    """
    with run_lock(run_dir, "check"):
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir)
        names = artifacts or [n for n in ARTIFACTS if n in manifest["files"]]
        if not names:
            raise RunDirError(f"{run_dir} has no exported models to check", hint="run edgetl export first")
        tampered = [n for n in verify_files(run_dir, manifest) if n in names or n in (MODEL, QAT_WEIGHTS)]
        if tampered:
            raise RunDirError(f"{', '.join(tampered)} in {run_dir} differ from the manifest's sha256")
        images, description, classes, reference = evaluation or float_evaluation(run_dir, manifest, data)
        description = dict(description)
        if "qat" in manifest["stages"]:
            description["quantised_from"] = QAT_WEIGHTS  # edgetl.quantize.qat: the reference stays model.pt
        report = measure(run_dir, names, images, description, classes, reference, thresholds)
        exported = manifest["stages"].get("export", {}).get("parity_evidence")
        for reason in weaker_evidence(report.evidence(), exported) if evaluation is None else []:
            log.warning("this verdict is weaker than the export's: %s; package refuses it unless "
                        "--accept-weak-parity", reason)  # fmt: skip
        write_report(run_dir, report, classes)
        return report


def float_evaluation(run_dir: Path, manifest: dict[str, Any], data: str | os.PathLike | None) -> Evaluation:
    """The held-out images (the validation split, or every image of ``data``) and the float model's logits."""
    from edgetl.data.heldout import evaluation_set
    from edgetl.train.checkpoint import load_checkpoint
    from edgetl.train.loop import torch_logits

    images, description, classes, _ = evaluation_set(run_dir, manifest, data)
    model, _ = load_checkpoint(run_dir)
    return images, description, classes, torch_logits(model, images.images)


def measure(run_dir: Path, names: list[str], images: Any, description: dict[str, Any], classes: list[str],
            reference: np.ndarray, thresholds: Thresholds) -> ParityReport:  # fmt: skip
    """Run every artifact ``names`` on ``images`` and judge it against the float ``reference``."""
    labels = images.labels
    results = {}
    for name in names:
        log.info("checking %s on %d images", name, len(labels))
        logits = runner_for(run_dir / name)(images.images)
        metrics = compare(reference, logits, labels, classes, list(images.paths), description.get("root"))
        fmt, precision = ARTIFACTS[name]
        metrics.update(format=fmt, precision=precision, passed=thresholds.passes(metrics))
        results[name] = metrics
    return ParityReport(
        passed=all(r["passed"] for r in results.values()),
        thresholds=thresholds,
        data=description,
        float_metrics=compare(reference, reference, labels, classes),
        artifacts=results,
    )


def write_report(run_dir: Path, report: ParityReport, classes: list[str]) -> None:
    """parity.json, parity.md, parity.png, and the verdicts in the manifest."""
    write_json(run_dir / "parity.json", report.to_dict())
    atomic_write(run_dir / "parity.md", parity_markdown(report))
    series = {"float (PyTorch)": [100.0 * report.float_metrics["per_class"][c]["top1"] for c in classes
                                  if c in report.float_metrics["per_class"]]}  # fmt: skip
    for name, metrics in report.artifacts.items():
        series[name] = [100.0 * metrics["per_class"][c]["top1"] for c in classes if c in metrics["per_class"]]
    shown = [c for c in classes if c in report.float_metrics["per_class"]]
    charts.per_class_bars(shown, series, run_dir / "parity.png")
    verdicts = {name: {k: m[k] for k in ("passed", "top1", "delta_top1_pp", "agreement", "sqnr_db")}
                for name, m in report.artifacts.items()}  # fmt: skip
    history = verdict_history(read_manifest(run_dir), report)
    update_manifest(run_dir, "check", ["parity.json", "parity.md", "parity.png"],
                    {"passed": report.passed, "thresholds": report.thresholds.to_dict(), "data": report.data,
                     "artifacts": verdicts}, top={"parity_history": history})  # fmt: skip


HISTORY_LIMIT = 100


def verdict_history(manifest: dict[str, Any], report: ParityReport) -> list[dict[str, Any]]:
    """Every verdict the run's current artifacts have had (oldest first, ``report`` last): per artifact
    the file's sha256 it was measured on and its metrics, with the evidence (source, count, digest,
    thresholds). Kept in the manifest's top-level ``parity_history``, which outlives a re-export (an
    export of the same model gives the same bytes, and their failures stand). A later, weaker check adds
    to it; it never erases a failure (:mod:`edgetl.package.gates` refuses to let a waiver overrule one).
    Verdicts about no file of the run any more, or against another float model, are dropped."""
    files = manifest["files"]
    entry = {
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reference": files[MODEL]["sha256"],  # the float model it was compared with
        "data": {k: report.data.get(k) for k in ("source", "root", "count", "sha256")},
        "thresholds": report.thresholds.to_dict(),
        "artifacts": {name: {"sha256": files[name]["sha256"], "passed": bool(m["passed"]), "top1": m["top1"],
                             "delta_top1_pp": m["delta_top1_pp"], "agreement": m["agreement"]}
                      for name, m in report.artifacts.items() if name in files},
    }  # fmt: skip
    previous = manifest.get("parity_history")

    def current(item: Any) -> bool:
        measured = item.get("artifacts") if isinstance(item, dict) else None
        return isinstance(measured, dict) and item.get("reference") == entry["reference"] and any(
            isinstance(a, dict) and (files.get(name) or {}).get("sha256") == a.get("sha256")
            for name, a in measured.items()
        )

    kept = [item for item in previous if current(item)] if isinstance(previous, list) else []
    return [*kept, entry][-HISTORY_LIMIT:]
