"""The one place that chains stages: export → parity check → (when int8 fails) diagnosis and remedies;
package → the bundle checked where the target runs it (:mod:`edgetl.ontarget`).

``edgetl export``, ``edgetl demo`` and ``make model`` (through ``edgetl export``) all go through
:func:`export_and_check`; ``edgetl package`` through :func:`package_verified`; no stage calls a later one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetl.check.metrics import ParityReport
from edgetl.check.parity import check
from edgetl.config import ExportConfig
from edgetl.errors import ExitCode, ParityRefused
from edgetl.export.artifacts import ExportResult, describe, export
from edgetl.rundir import ARTIFACTS, run_lock, update_manifest

if TYPE_CHECKING:
    from edgetl.package.bundle import PackageResult
    from edgetl.targets import Target

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


def package_verified(run_dir: str | os.PathLike, target: Target, out: str | os.PathLike | None = None,
                     force: bool = False, *, on_target: bool = True, **options: Any) -> PackageResult:  # fmt: skip
    """``package``, with the bundle checked where the target runs it (emulated) before it is written,
    for targets edgetl can emulate; a verdict with an unchanged fingerprint is reused, not measured again.

    Raises:
        what :func:`edgetl.package.bundle.package` raises; MissingDependencyError when qemu-user or
        debootstrap is missing (exit 5, unless ``on_target=False``); ParityRefused when the on-target
        verdict fails the target's thresholds (unless ``force``); what the on-target run raises.
    """
    from edgetl.ontarget import verdict
    from edgetl.package.bundle import package

    hook = None
    if verdict.can_emulate(target) and not on_target:
        hook = lambda staged: {"skipped": "packaged with --no-on-target"}  # noqa: E731
    elif verdict.can_emulate(target):
        from edgetl.ontarget.userland import Userland, require_tools

        require_tools(Userland.parse(target.device.userland).qemu_arch)  # before any work: exit 5 at once
        hook = lambda staged: _on_target_gate(Path(run_dir), target, staged, force)  # noqa: E731
    return package(run_dir, target, out, force, on_target=hook, **options)


def _on_target_gate(run_dir: Path, target: Target, staged: Path, force: bool) -> dict[str, Any]:
    from edgetl.ontarget import verdict

    print_ = verdict.fingerprint(staged, target, verdict.where_key(target, None), None)
    record = verdict.recorded(run_dir, target, print_)
    if record is None:
        log.info("checking %s on %s's CPU (emulated %s)", target.artifact, target.name, target.device.emulate)
        record = verdict.measure(run_dir, target, staged)
    if not record["passed"] and not force:
        raise ParityRefused(f"{target.artifact} failed parity on {record['described']}: {verdict.shortfall(record)}",
                            hint="see parity.md (Where it runs); --force packages anyway, recorded")  # fmt: skip
    return verdict.bundle_summary(record)


def check_on_target(run_dir: str | os.PathLike, target: Target, *, ssh: str | None = None,
                    data: str | None = None, mediapipe: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Package the run for ``target`` into a private folder and measure that bundle where the target runs
    it (emulated, or on the board ``ssh``; or in MediaPipe Tasks with the interpreter ``mediapipe``); the
    verdict is recorded in the run (the host verdict stays).

    Raises:
        RunDirError / ConstraintViolated: the run cannot be packaged for the target at all.
        ConfigError: the target cannot be emulated and no board was given.
        what :func:`edgetl.ontarget.verdict.measure` raises.
    """
    import tempfile

    from edgetl.errors import ConfigError
    from edgetl.ontarget import verdict
    from edgetl.package.bundle import package

    if not ssh and not mediapipe and not verdict.can_emulate(target):
        raise ConfigError(f"{target.name} has no CPU edgetl can emulate ([device] emulate and userland)",
                          hint="give a board with --ssh HOST, or a Linux-class target: rpi4-cpu, rpi5-cpu")  # fmt: skip
    if not ssh and not mediapipe:
        from edgetl.ontarget.userland import Userland, require_tools

        require_tools(Userland.parse(target.device.userland).qemu_arch)
    with tempfile.TemporaryDirectory(prefix="edgetl-on-target-") as tmp:
        staged = package(run_dir, target, tmp, force=True, accept_weak_parity=True, compile_model=False,
                         check_tflm=False)  # fmt: skip
        return verdict.measure(Path(run_dir), target, staged.bundle_dir, ssh=ssh, data=data, mediapipe=mediapipe)
