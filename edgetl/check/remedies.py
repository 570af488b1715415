"""When the int8 model fails parity: find the layers that lose accuracy, and try remedies in order.

1. **Diagnosis**: TFLite's QuantizationDebugger runs float and int8 side by side and measures every
   quantised layer's error; layers are ranked by RMSE relative to their quantisation scale (error in
   units of one int8 step), the usual measure of how badly a layer quantises.
2. **More calibration images** (four times the recipe's, up to the whole training split): fixes
   ranges that a small sample got wrong.
3. **16-bit activations, 8-bit weights** (``model_int16x8.tflite``): fixes layers whose activation
   range is too wide for 256 levels. It is not an int8 model and never carries that name; targets
   that need int8 (Edge TPU, Ethos-U) cannot use it.

TFLite's converter offers only min/max calibration, so "another calibration method" (percentile,
entropy) is not among the remedies. Per-tensor MSE-optimal ranges written into the int8 model instead
(biases re-scaled to match) were tried on the sign-language run and on a run that fails the gate: logit
SQNR moved by at most about 1 dB either way and agreement up or down by a few images, so not kept.
Each attempt's parity is recorded in ``parity.json`` and the manifest, whether it helped or not.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.check.metrics import ParityReport, compare
from edgetl.check.parity import check
from edgetl.check.report_md import remedies_markdown
from edgetl.check.runners import runner_for
from edgetl.export.artifacts import bias_correction_wanted
from edgetl.export.convert import ConverterJob, run_converter
from edgetl.rundir import atomic_write, read_manifest, update_manifest, write_json

log = logging.getLogger(__name__)


def layer_name(tensor: str) -> str:
    """The layer a TFLite tensor belongs to: the innermost name scope of its first (fused) name.

    ``features.2/features.2.conv.0.0/Relu6;features.2/...;Const_98`` -> ``features.2.conv.0.0`` (the
    PyTorch module path, see :mod:`edgetl.export.tf_graph`); ``features.3/add`` -> ``features.3``. The model's
    output tensor carries the converter's name for the function result (``PartitionedCall:0``): "logits".
    """
    scopes = tensor.split(";")[0].split("/")
    if len(scopes) == 1 and "PartitionedCall" in scopes[0]:
        return "logits"
    return scopes[-2] if len(scopes) > 1 else scopes[0]


def worst_layers(csv_path: Path, top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` layers with the largest RMSE / scale in a QuantizationDebugger dump."""
    rows = []
    with open(csv_path) as fh:
        for row in csv.DictReader(fh):
            try:
                scale, mse = float(row["scale"]), float(row["mean_squared_error"])
            except (KeyError, ValueError):
                continue
            if scale > 0 and math.isfinite(mse):
                rows.append({
                    "layer": layer_name(row.get("tensor_name", "")),
                    "op": row.get("op_name", ""),
                    "tensor": row.get("tensor_name", ""),
                    "rmse_over_scale": math.sqrt(mse) / scale,
                    "max_abs_error": float(row.get("max_abs_error", "nan")),
                })  # fmt: skip
    rows.sort(key=lambda r: r["rmse_over_scale"], reverse=True)
    return rows[:top]


def diagnose_and_remedy(
    run_dir: Path,
    workdir: Path,
    cfg: Any,
    report: ParityReport,
    splits: Any,
    spec: Any,
    evaluation: tuple[Any, dict[str, Any], list[str], np.ndarray],
    data: str | os.PathLike | None,
) -> tuple[ParityReport, list[dict[str, Any]]]:
    """Diagnose the failing int8 model and try the remedies; return the final report and attempts.

    ``evaluation``: the export's parity data, as :func:`edgetl.check.parity.check` takes it (validation
    images, their description and classes, the float model's logits on them). ``workdir``: the export's
    work folder, which holds the converted float model the remedies re-quantise.
    """
    log.warning("int8 model failed parity; diagnosing layer by layer")
    attempts = [_diagnosis(run_dir, workdir)]
    trial = _Trial(run_dir, workdir, cfg, evaluation)
    # Remedy 1: a bigger calibration set from the training split.
    if splits is not None and cfg.calib_dir is None:
        try:
            passed = _more_calibration(trial, splits, spec, attempts)
        except Exception as exc:  # a remedy that breaks is reported, never hides the parity failure
            attempts.append({"remedy": "more calibration images", "passed": False, "error": str(exc)[:300]})
            passed = False
        if passed:
            return check(run_dir, cfg.thresholds, data, evaluation=evaluation), attempts
    # Remedy 2: 16-bit activations (a different artifact, never called int8).
    try:
        _int16_activations(trial, attempts)
    except Exception as exc:
        attempts.append({"remedy": "16-bit activations (model_int16x8.tflite)", "passed": False,
                         "error": str(exc)[:300]})  # fmt: skip
    return check(run_dir, cfg.thresholds, data, evaluation=evaluation), attempts


class _Trial:
    """Converting and judging a remedy's model against the export's float reference."""

    def __init__(self, run_dir: Path, workdir: Path, cfg: Any, evaluation: tuple):
        self.run_dir, self.workdir, self.cfg = run_dir, workdir, cfg
        self.val, _, self.classes, self.reference = evaluation

    def convert(self, **job: Any) -> None:
        """Run the converter; the quantised model it makes is finished for other tools as the export's are."""
        from edgetl.export.tool_metadata import describe_run, finish_for_tools

        correct = bias_correction_wanted(self.cfg, read_manifest(self.run_dir))
        run_converter(ConverterJob(workdir=str(self.workdir), bias_correction=correct,
                                   float_model=str(self.run_dir / "model_float32.tflite"), **job),
                      self.run_dir / "export.log")  # fmt: skip
        made = job.get("output") or f"model_{'int8' if job.get('int8') else 'int16x8'}.tflite"  # as the converter
        finish_for_tools(self.workdir / made, describe_run(self.run_dir), self.cfg.int8_output)

    def evaluate(self, path: Path) -> dict[str, Any]:
        metrics = compare(self.reference, runner_for(path)(self.val.images), self.val.labels, self.classes)
        metrics["passed"] = self.cfg.thresholds.passes(metrics)
        return metrics

    @staticmethod
    def summary(name: str, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
        keep = ("passed", "top1", "delta_top1_pp", "agreement", "sqnr_db")
        return {"remedy": name, **{k: metrics[k] for k in keep}, **extra}


def _diagnosis(run_dir: Path, workdir: Path) -> dict[str, Any]:
    """TFLite's QuantizationDebugger on the int8 model: the layers with the largest error."""
    diagnosis: dict[str, Any] = {}
    try:
        run_converter(ConverterJob(workdir=str(workdir), diagnose=True, calibration=str(workdir / "calibration.npy")),
                      run_dir / "export.log")  # fmt: skip
        diagnosis["worst_layers"] = worst_layers(workdir / "layer_stats.csv")
    except Exception as exc:  # a diagnosis that fails must not hide the parity failure itself
        diagnosis["error"] = str(exc)
    return {"remedy": "diagnosis", **diagnosis}


def _more_calibration(trial: _Trial, splits: Any, spec: Any, attempts: list[dict[str, Any]]) -> bool:
    """Re-quantise with four times the recipe's images; keep the result if it passes."""
    from edgetl.quantize.recipes import calibration_set, load_recipe

    recipe = load_recipe(trial.cfg.calib)
    bigger = replace(recipe, per_class=recipe.per_class * 4, max_images=recipe.max_images * 4,
                     name=f"{recipe.name}x4")  # fmt: skip
    calibration = calibration_set(splits, spec, bigger, None, guard_samples=splits.test, guard_split=trial.val)
    np.save(trial.workdir / "calibration_more.npy", calibration.images)
    trial.convert(int8=True, calibration=str(trial.workdir / "calibration_more.npy"), output="candidate_int8.tflite")
    metrics = trial.evaluate(trial.workdir / "candidate_int8.tflite")
    attempts.append(trial.summary("more calibration images", metrics, images=len(calibration.paths),
                                  calibration_sha256=calibration.sha256))  # fmt: skip
    if metrics["passed"]:
        os.replace(trial.workdir / "candidate_int8.tflite", trial.run_dir / "model_int8.tflite")
        _record(trial.run_dir, "model_int8.tflite", calibration.description)
    return bool(metrics["passed"])


def _int16_activations(trial: _Trial, attempts: list[dict[str, Any]]) -> None:
    """16-bit activations with 8-bit weights; kept as model_int16x8.tflite if it passes."""
    trial.convert(int16x8=True, calibration=str(trial.workdir / "calibration.npy"))
    metrics = trial.evaluate(trial.workdir / "model_int16x8.tflite")
    attempts.append(trial.summary("16-bit activations (model_int16x8.tflite)", metrics))
    if metrics["passed"]:
        shutil.move(trial.workdir / "model_int16x8.tflite", trial.run_dir / "model_int16x8.tflite")
        _record(trial.run_dir, "model_int16x8.tflite", None)


def _record(run_dir: Path, name: str, calibration: dict[str, Any] | None) -> None:
    manifest = read_manifest(run_dir)
    info = manifest["stages"]["export"]
    if calibration is not None:
        info["calibration"] = calibration
    update_manifest(run_dir, "export", [name], info)


def record_remedies(run_dir: Path, remedies: list[dict[str, Any]]) -> None:
    """Add the int8 diagnosis and remedy attempts to parity.json / parity.md (and their hashes)."""
    import json

    report = json.loads((run_dir / "parity.json").read_text())
    report["int8_remedies"] = remedies
    write_json(run_dir / "parity.json", report)
    lines = remedies_markdown(run_dir, report, remedies)
    atomic_write(run_dir / "parity.md", (run_dir / "parity.md").read_text() + "\n".join(lines) + "\n")
    manifest_check = read_manifest(run_dir)["stages"]["check"]
    update_manifest(run_dir, "check", ["parity.json", "parity.md"], manifest_check)
