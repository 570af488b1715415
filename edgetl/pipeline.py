"""The one place that chains stages: export → parity check → (when int8 fails) diagnosis and remedies.

``edgetl export``, ``edgetl demo`` and ``make model`` (through ``edgetl export``) all go through
:func:`export_and_check`; no stage calls a later one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl.check.metrics import ParityReport
from edgetl.check.parity import check
from edgetl.config import ExportConfig
from edgetl.errors import ExitCode
from edgetl.export.artifacts import ExportResult, describe, export
from edgetl.rundir import ARTIFACTS, run_lock, update_manifest

log = logging.getLogger(__name__)


@dataclass
class ExportReport:
    """An export and its verdict: what ``edgetl export`` prints and exits with."""

    export: ExportResult
    parity: ParityReport
    remedies: list[dict[str, Any]]

    @property
    def run_dir(self) -> Path:
        return self.export.run_dir

    @property
    def artifacts(self) -> dict[str, dict[str, Any]]:
        return self.export.artifacts

    @property
    def timings(self) -> dict[str, float]:
        return self.export.timings

    @property
    def calibration(self) -> dict[str, Any] | None:
        return self.export.calibration

    @property
    def exit_code(self) -> ExitCode:
        return self.parity.exit_code

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "artifacts": self.artifacts,
            "parity_passed": self.parity.passed,
            "parity": {n: {k: a[k] for k in ("passed", "top1", "delta_top1_pp", "agreement")}
                       for n, a in self.parity.artifacts.items()},  # fmt: skip
            "calibration": self.export.calibration,
            "remedies": self.remedies,
            "timings": self.timings,
        }


def export_and_check(run_dir: str | os.PathLike, cfg: ExportConfig = ExportConfig(),  # noqa: B008
                     data: str | None = None) -> ExportReport:  # fmt: skip
    """Export the run, check every artifact's parity and, when the int8 model fails, diagnose it and
    try the remedies (more calibration images, then 16-bit activations); all of it under the run's lock.

    Raises:
        what :func:`edgetl.export.artifacts.export` and :func:`edgetl.check.parity.check` raise.
    """
    started = time.perf_counter()
    with run_lock(run_dir, "export"):
        exported = export(run_dir, cfg, data, keep_workdir=cfg.remedies)
        try:
            report, remedies = _judge(exported, cfg, data)
        finally:
            if exported.workdir is not None:
                shutil.rmtree(exported.workdir, ignore_errors=True)
        timings = exported.timings
        timings["total_s"] = time.perf_counter() - started
        exported.info.update(timings=timings, remedies=remedies, parity_passed=report.passed,
                             parity_evidence=report.evidence())  # what a later `check` may not undercut  # fmt: skip
        update_manifest(exported.run_dir, "export", [*sorted(exported.artifacts), "export.log"], exported.info)
        return ExportReport(exported, report, remedies)


def _judge(exported: ExportResult, cfg: ExportConfig, data: str | None) -> tuple[ParityReport, list[dict]]:
    """Parity of the fresh artifacts; the int8 remedies when the int8 model fails."""
    run_dir, timings = exported.run_dir, exported.timings
    t0 = time.perf_counter()
    report = check(run_dir, cfg.thresholds, data, evaluation=exported.evaluation)
    timings["parity_s"] = time.perf_counter() - t0
    int8 = report.artifacts.get("model_int8.tflite")
    if not (cfg.int8 and cfg.remedies and int8 is not None and not int8["passed"]):
        return report, []
    from edgetl.check.remedies import diagnose_and_remedy, record_remedies

    t0 = time.perf_counter()
    report, remedies = diagnose_and_remedy(run_dir, exported.workdir, cfg, report, exported.splits, exported.spec,
                                           exported.evaluation, data)  # fmt: skip
    timings["remedies_s"] = time.perf_counter() - t0
    record_remedies(run_dir, remedies)
    for name in ARTIFACTS:  # a remedy may have added a variant (model_int16x8.tflite)
        if name not in exported.artifacts and (run_dir / name).is_file():
            exported.artifacts[name] = describe(run_dir, name)
    return report, remedies
