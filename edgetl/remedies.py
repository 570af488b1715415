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

from edgetl.parity import ParityReport, check, compare, runner_for

log = logging.getLogger(__name__)


def layer_name(tensor: str) -> str:
    """The layer a TFLite tensor belongs to: the innermost name scope of its first (fused) name.

    ``features.2/features.2.conv.0.0/Relu6;features.2/...;Const_98`` -> ``features.2.conv.0.0`` (the
    PyTorch module path, see :mod:`edgetl.tf_graph`); ``features.3/add`` -> ``features.3``. The model's
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

    ``evaluation``: the export's parity data, as :func:`edgetl.parity.check` takes it (validation images,
    their description and classes, the float model's logits on them).
    """
    from edgetl.artifacts import read_manifest
    from edgetl.export import _run_converter, bias_correction_wanted

    log_path = run_dir / "export.log"
    val, _, classes, reference = evaluation
    labels = val.labels
    attempts: list[dict[str, Any]] = []

    def evaluate(path: Path) -> dict[str, Any]:
        metrics = compare(reference, runner_for(path)(val.images), labels, classes)
        metrics["passed"] = cfg.thresholds.passes(metrics)
        return metrics

    def summary(name: str, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
        keep = ("passed", "top1", "delta_top1_pp", "agreement", "sqnr_db")
        return {"remedy": name, **{k: metrics[k] for k in keep}, **extra}

    log.warning("int8 model failed parity; diagnosing layer by layer")
    diagnosis: dict[str, Any] = {}
    try:
        _run_converter({"onnx": None, "workdir": str(workdir), "diagnose": True,
                        "calibration": str(workdir / "calibration.npy")}, log_path)  # fmt: skip
        diagnosis["worst_layers"] = worst_layers(workdir / "layer_stats.csv")
    except Exception as exc:  # a diagnosis that fails must not hide the parity failure itself
        diagnosis["error"] = str(exc)
    attempts.append({"remedy": "diagnosis", **diagnosis})

    # Remedy 1: a bigger calibration set from the training split.
    if splits is not None and cfg.calib_dir is None:
        try:
            passed = _more_calibration(run_dir, workdir, cfg, splits, spec, val, evaluate, summary, attempts)
        except Exception as exc:  # a remedy that breaks is reported, never hides the parity failure
            attempts.append({"remedy": "more calibration images", "passed": False, "error": str(exc)[:300]})
            passed = False
        if passed:
            return check(run_dir, cfg.thresholds, data, evaluation=evaluation), attempts

    # Remedy 2: 16-bit activations (a different artifact, never called int8).
    try:
        _run_converter({"onnx": None, "workdir": str(workdir), "int16x8": True,
                        "calibration": str(workdir / "calibration.npy"),
                        "bias_correction": bias_correction_wanted(cfg, read_manifest(run_dir)),
                        "float_model": str(run_dir / "model_float32.tflite")}, log_path)  # fmt: skip
        metrics = evaluate(workdir / "model_int16x8.tflite")
        attempts.append(summary("16-bit activations (model_int16x8.tflite)", metrics))
        if metrics["passed"]:
            shutil.move(workdir / "model_int16x8.tflite", run_dir / "model_int16x8.tflite")
            _record(run_dir, "model_int16x8.tflite", None)
    except Exception as exc:
        attempts.append({"remedy": "16-bit activations (model_int16x8.tflite)", "passed": False,
                         "error": str(exc)[:300]})  # fmt: skip
    final = check(run_dir, cfg.thresholds, data, evaluation=evaluation)
    return final, attempts


def _more_calibration(run_dir, workdir, cfg, splits, spec, val, evaluate, summary, attempts) -> bool:
    """Re-quantise with four times the recipe's images; keep the result if it passes."""
    from edgetl.artifacts import read_manifest
    from edgetl.calib import calibration_set, load_recipe
    from edgetl.export import _run_converter, bias_correction_wanted

    recipe = load_recipe(cfg.calib)
    bigger = replace(recipe, per_class=recipe.per_class * 4, max_images=recipe.max_images * 4,
                     name=f"{recipe.name}x4")  # fmt: skip
    guard = list(val.paths) + [str(s.path) for s in splits.test]
    calibration = calibration_set(splits, spec, bigger, None, guard_paths=guard)
    np.save(workdir / "calibration_more.npy", calibration.images)
    _run_converter({"onnx": None, "workdir": str(workdir), "int8": True,
                    "calibration": str(workdir / "calibration_more.npy"),
                    "bias_correction": bias_correction_wanted(cfg, read_manifest(run_dir)),
                    "float_model": str(run_dir / "model_float32.tflite"),
                    "output": "candidate_int8.tflite"}, run_dir / "export.log")  # fmt: skip
    metrics = evaluate(workdir / "candidate_int8.tflite")
    attempts.append(summary("more calibration images", metrics, images=len(calibration.paths),
                            calibration_sha256=calibration.sha256))  # fmt: skip
    if metrics["passed"]:
        os.replace(workdir / "candidate_int8.tflite", run_dir / "model_int8.tflite")
        _record(run_dir, "model_int8.tflite", calibration.description)
    return bool(metrics["passed"])


def _record(run_dir: Path, name: str, calibration: dict[str, Any] | None) -> None:
    from edgetl.artifacts import read_manifest, update_manifest

    manifest = read_manifest(run_dir)
    info = manifest["stages"]["export"]
    if calibration is not None:
        info["calibration"] = calibration
    update_manifest(run_dir, "export", [name], info)
