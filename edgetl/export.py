"""Export a fine-tuned run to ONNX and TFLite (float32 and full-integer int8), then check parity.

* ``model.onnx``: torch's exporter, ``onnx.checker``, and onnxruntime against PyTorch on real
  validation images (max abs logit difference within ``float_tolerance``).
* ``model_float32.tflite``: TFLiteConverter on the model rebuilt in TensorFlow from its PyTorch
  weights (:mod:`edgetl.tf_graph`; or onnx2tf's conversion of the ONNX with ``converter="onnx2tf"``),
  same check.
* ``model_int8.tflite``: TFLiteConverter on that float model with a representative dataset from
  a calibration recipe; full-integer (int8 ops, per-channel weights), uint8 RGB NHWC input with scale 1
  and zero point 0 — raw pixels, normalisation inside the graph — batch 1, static shape.

TensorFlow runs in a child process (:mod:`edgetl.tflite_convert`) whose output goes to
``export.log``. Artifacts are built in a work folder and moved into the run only once they passed
their checks, so a failed or interrupted export leaves nothing a later step would trust.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.artifacts import MODEL, QAT_WEIGHTS, read_manifest, update_manifest, write_json
from edgetl.errors import EdgetlError, ExitCode, RunDirError
from edgetl.parity import ARTIFACTS, ParityReport, Thresholds, runner_for
from edgetl.subproc import die_with_parent

log = logging.getLogger(__name__)

WORKDIR = ".export-work"


class ExportError(EdgetlError):
    """A conversion failed or produced a model that does not match what it claims to be."""


class ParityFailed(EdgetlError):
    exit_code = ExitCode.PARITY_FAILED


@dataclass(frozen=True)
class ExportConfig:
    int8: bool = True  # also produce the full-integer model
    calib: str = "default"  # calibration recipe: a name in calib/ or a .toml path
    calib_dir: str | None = None  # the user's own calibration images instead of a recipe
    opset: int = 17  # ONNX opset
    float_tolerance: float = 1e-4  # max abs logit difference of float exports vs PyTorch
    verify_images: int = 64  # validation images used for that float check
    remedies: bool = True  # when int8 fails parity: diagnose and try remedies
    bias_correction: bool | None = None  # None: the recipe decides (on by default)
    equalize: bool = True  # int8: equalise activation ranges in the int8 model's weights first (edgetl.prequant)
    converter: str = "direct"  # TFLite route: "direct" (edgetl.tf_graph) or "onnx2tf"
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass
class ExportResult:
    run_dir: Path
    artifacts: dict[str, dict[str, Any]]
    parity: ParityReport
    calibration: dict[str, Any] | None
    remedies: list[dict[str, Any]]
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "artifacts": self.artifacts,
            "parity_passed": self.parity.passed,
            "parity": {n: {k: a[k] for k in ("passed", "top1", "delta_top1_pp", "agreement")}
                       for n, a in self.parity.artifacts.items()},  # fmt: skip
            "calibration": self.calibration,
            "remedies": self.remedies,
            "timings": self.timings,
        }


def tool_versions() -> dict[str, str]:
    versions = {}
    for dist in ("torch", "onnx", "onnxruntime", "onnx2tf", "onnxscript", "tensorflow", "ai-edge-litert"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def export_onnx(model: Any, image_size: int, path: Path, opset: int) -> None:
    """Batch-1, static-shape ONNX with input ``pixels`` (float RGB 0..255, NCHW), output ``logits``."""
    import warnings

    import torch

    example = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # The TorchScript-based exporter: ~1 s for MobileNetV2 where the dynamo exporter takes ~15 s
        # on this class of machine, with the same graph after onnx2tf's simplification.
        torch.onnx.export(
            model, (example,), str(path), input_names=["pixels"], output_names=["logits"],
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )  # fmt: skip
    import onnx

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _max_abs_diff(reference: np.ndarray, path: Path, images: np.ndarray) -> float:
    return float(np.abs(runner_for(path)(images) - reference).max())


def _run_converter(job: dict[str, Any], log_path: Path) -> dict[str, Any]:
    """Run :mod:`edgetl.tflite_convert` in a child process; its output is appended to ``log_path``."""
    job_path = Path(job["workdir"]) / "job.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log_file:
        proc = subprocess.run(
            [sys.executable, "-m", "edgetl.tflite_convert", str(job_path)],
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=env, preexec_fn=die_with_parent(),
        )  # fmt: skip
        log_file.write(proc.stdout)
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise ExportError(
            f"TFLite conversion failed (exit {proc.returncode}): {tail[0][:300]}",
            hint=f"the full log is in {log_path}",
        )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    return json.loads(last)


def bias_correction_wanted(cfg: ExportConfig, manifest: dict[str, Any]) -> bool:
    """An explicit setting wins; then a QAT run gets none; then the recipe; a user's --calib-dir gets the
    default (on).

    QAT trained the weights against the int8 rounding it simulated, which has no bias correction; the
    correction would shift the biases QAT chose. (Re-exporting two sign-language QAT runs with and
    without it favoured leaving it off; a one-off comparison, not a kept benchmark.)
    """
    from edgetl.calib import CalibRecipe, load_recipe

    if cfg.bias_correction is not None:
        return cfg.bias_correction
    if "qat" in manifest.get("stages", {}):
        return False
    return (load_recipe(cfg.calib) if cfg.calib_dir is None else CalibRecipe()).bias_correction


def export(
    run_dir: str | os.PathLike, cfg: ExportConfig = ExportConfig(), data: str | None = None  # noqa: B008
) -> ExportResult:
    """:func:`_export` holding the run's lock: a second export (or any other writer) of the same run
    is refused instead of corrupting this one's work folder and log."""
    from edgetl.artifacts import run_lock

    if not (Path(run_dir) / MODEL).is_file():  # say so before the lock creates the folder
        raise RunDirError(f"{run_dir} has no {MODEL}", hint="run edgetl finetune first")
    with run_lock(run_dir, "export"):
        return _export(run_dir, cfg, data)


def _export(run_dir: str | os.PathLike, cfg: ExportConfig, data: str | None) -> ExportResult:
    """Export, verify and parity-check a fine-tuned run. See the module docstring.

    Raises:
        RunDirError: no fine-tuned model in ``run_dir``.
        ExportError: a conversion failed, or a float export differs from PyTorch.
        DataError, ConfigError: calibration data or recipe problems (incl. leakage).
    """
    from edgetl.calib import calibration_set, load_recipe
    from edgetl.parity import check, evaluation_set, torch_logits
    from edgetl.runtime.preprocess import PreprocessSpec
    from edgetl.tflite_inspect import inspect_tflite
    from edgetl.train import load_checkpoint

    started = time.perf_counter()
    run_dir = Path(run_dir)
    model, checkpoint = load_checkpoint(run_dir)
    manifest = read_manifest(run_dir)
    # A QAT run: model.pt is the float model it started from (exported as float, the parity reference);
    # the int8 model is quantised from the quantisation-aware weights.
    int8_model = None
    if cfg.int8 and "qat" in manifest["stages"]:
        if cfg.converter != "direct":
            raise ExportError("a QAT run's int8 model is built by the direct converter",
                              hint="export without --converter onnx2tf")  # fmt: skip
        int8_model, _ = load_checkpoint(run_dir, QAT_WEIGHTS)
    spec = PreprocessSpec.from_dict(checkpoint["preprocess"])
    recipe = load_recipe(cfg.calib) if cfg.int8 and cfg.calib_dir is None else None

    # Validation images for the float checks (and the leakage guard), and the calibration set.
    val, val_description, classes, splits = evaluation_set(run_dir, manifest, data)
    val_reference = torch_logits(model, val.images)  # the parity check's reference too (below)
    verify, reference = val.images[: cfg.verify_images], val_reference[: cfg.verify_images]
    calibration = None
    if cfg.int8:
        if splits is None and cfg.calib_dir is None:
            raise RunDirError(
                "int8 calibration needs the run's training split, but --data replaced it",
                hint="export without --data, or use --calib-dir with --data",
            )
        guard = list(val.paths) + ([str(s.path) for s in splits.test] if splits else [])
        calibration = calibration_set(splits, spec, recipe, cfg.calib_dir, guard_paths=guard)
        log.info("calibration: %d images (sha256 %s…)", len(calibration.paths), calibration.sha256[:12])
    qat_weights = int8_model is not None
    equalization = relu_equalization = None
    if calibration is not None and cfg.equalize:
        from edgetl.prequant import equalize, equalize_for_int8

        if cfg.converter == "direct":  # the int8 model gets its own graph; the float exports are the trained model
            if int8_model is None:  # (a QAT run's weights were equalised before training and are used as trained:
                # equalising again would move the reading convolutions' int8 grids away from the ones QAT learned)
                int8_model, equalization, relu_equalization = equalize_for_int8(model, calibration.images)
        else:  # onnx2tf quantises the ONNX model: the exact transform only, checked against ``reference`` below
            equalization = equalize(model, calibration.images)

    workdir = (run_dir / WORKDIR).resolve()  # absolute: the converter runs with its own cwd
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    log_path = run_dir / "export.log"
    log_path.unlink(missing_ok=True)
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        export_onnx(model, spec.image_size, workdir / "model.onnx", cfg.opset)
        timings["onnx_s"] = time.perf_counter() - t0
        onnx_diff = _max_abs_diff(reference, workdir / "model.onnx", verify)
        if onnx_diff > cfg.float_tolerance:
            raise ExportError(f"ONNX logits differ from PyTorch by {onnx_diff:.2e} > {cfg.float_tolerance}")

        correct = cfg.int8 and bias_correction_wanted(cfg, manifest)
        job = {"workdir": str(workdir), "int8": cfg.int8, "bias_correction": correct}
        if cfg.converter == "onnx2tf":
            job["onnx"] = str(workdir / "model.onnx")
        else:
            from edgetl.tf_graph import UnsupportedModel, save_graph
            from edgetl.tflite_convert import GRAPH, GRAPH_INT8

            try:
                save_graph(model, spec.image_size, workdir / GRAPH)
                if int8_model is not None:
                    save_graph(int8_model, spec.image_size, workdir / GRAPH_INT8)
            except UnsupportedModel as exc:
                raise ExportError(f"the direct TFLite converter does not know {exc}",
                                  hint="export with --converter onnx2tf") from None  # fmt: skip
            job["graph"] = True
        if calibration is not None:
            np.save(workdir / "calibration.npy", calibration.images)
            job["calibration"] = str(workdir / "calibration.npy")
        log.info("converting to TFLite (%s%s)…", cfg.converter, " + int8" if cfg.int8 else "")
        t0 = time.perf_counter()
        converted = _run_converter(job, log_path)
        timings["converter_process_s"] = time.perf_counter() - t0  # incl. starting Python and TensorFlow
        timings.update(converted["timings"])
        bias_correction = converted["bias_correction"].get("int8")
        int8_calibration = converted.get("calibration", {}).get("int8")
        tflite_diff = _max_abs_diff(reference, workdir / "model_float32.tflite", verify)
        if tflite_diff > cfg.float_tolerance:
            raise ExportError(
                f"float32 TFLite logits differ from PyTorch by {tflite_diff:.2e} > {cfg.float_tolerance}"
            )
        produced = {"model.onnx": {"max_abs_logit_diff_vs_torch": onnx_diff},
                    "model_float32.tflite": {"max_abs_logit_diff_vs_torch": tflite_diff}}  # fmt: skip
        if cfg.int8:
            facts = inspect_tflite(str(workdir / "model_int8.tflite"))
            problems = facts.full_integer_problems()
            if problems:
                raise ExportError(f"the int8 model is not full-integer: {'; '.join(problems)}")
            produced["model_int8.tflite"] = {"structure": facts.to_dict()}

        # Everything passed its own checks: move into the run, drop stale exports of earlier runs.
        for name in ARTIFACTS:
            if name not in produced:
                (run_dir / name).unlink(missing_ok=True)
        for name in produced:
            os.replace(workdir / name, run_dir / name)
    except BaseException:  # failed or interrupted: nothing of it stays
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    if not (cfg.int8 and cfg.remedies):  # the remedies re-quantise the converted model kept in the workdir
        shutil.rmtree(workdir, ignore_errors=True)

    artifacts = {}
    for name, extra in produced.items():
        fmt, precision = ARTIFACTS[name]
        artifacts[name] = {"format": fmt, "precision": precision, "bytes": (run_dir / name).stat().st_size,
                           **_io_spec(run_dir / name), **extra}  # fmt: skip
    manifest = read_manifest(run_dir)
    for name in list(manifest["files"]):
        if name in ARTIFACTS and name not in produced:
            del manifest["files"][name]
    manifest["stages"].pop("check", None)  # verdicts of earlier exports do not apply to these files
    write_json(run_dir / "manifest.json", manifest)
    export_info = {
        "artifacts": artifacts,
        "calibration": calibration.description if calibration else None,
        "bias_correction": bias_correction,
        "int8_calibration_split": int8_calibration,  # edgetl.tflite_calibrate: images the helper process took
        "equalization": equalization,
        "relu_equalization": relu_equalization,
        "converter": cfg.converter,
        "int8_weights": QAT_WEIGHTS if qat_weights else (MODEL if cfg.int8 else None),
        "onnx_opset": cfg.opset,
        "float_tolerance": cfg.float_tolerance,
        "verified_on_images": int(len(verify)),
        "timings": timings,
        "versions": tool_versions(),
    }
    update_manifest(run_dir, "export", [*sorted(produced), "export.log"], export_info)

    t0 = time.perf_counter()
    evaluation = (val, val_description, classes, val_reference)
    report = check(run_dir, cfg.thresholds, data, evaluation=evaluation)
    timings["parity_s"] = time.perf_counter() - t0
    remedies: list[dict[str, Any]] = []
    if cfg.int8 and not report.artifacts["model_int8.tflite"]["passed"] and cfg.remedies:
        from edgetl.parity import record_remedies
        from edgetl.remedies import diagnose_and_remedy

        t0 = time.perf_counter()
        report, remedies = diagnose_and_remedy(run_dir, workdir, cfg, report, splits, spec, evaluation, data)
        timings["remedies_s"] = time.perf_counter() - t0
        record_remedies(run_dir, remedies)
        for name in ARTIFACTS:  # a remedy may have added a variant (model_int16x8.tflite)
            if name not in produced and (run_dir / name).is_file():
                produced[name] = {"remedy": True}
                fmt, precision = ARTIFACTS[name]
                artifacts[name] = {"format": fmt, "precision": precision,
                                   "bytes": (run_dir / name).stat().st_size, **_io_spec(run_dir / name)}  # fmt: skip
    shutil.rmtree(workdir, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - started
    export_info.update(timings=timings, remedies=remedies, parity_passed=report.passed,
                       parity_evidence=report.evidence())  # what a later `check` may not undercut  # fmt: skip
    update_manifest(run_dir, "export", [*sorted(produced), "export.log"], export_info)
    return ExportResult(
        run_dir=run_dir,
        artifacts=artifacts,
        parity=report,
        calibration=calibration.description if calibration else None,
        remedies=remedies,
        timings=timings,
    )


def _io_spec(path: Path) -> dict[str, Any]:
    runner_for(path)  # a file that is not a whole model is a RunDirError, not an interpreter crash
    if path.suffix == ".tflite":
        from edgetl.runtime.model import TFLiteClassifier

        model = TFLiteClassifier(str(path))
        return {"input": model.input.to_dict(), "output": model.output.to_dict()}
    import onnx

    graph = onnx.load(str(path)).graph

    def spec(value: Any) -> dict[str, Any]:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        return {"name": value.name, "shape": dims, "dtype": "float32"}

    return {"input": spec(graph.input[0]), "output": spec(graph.output[0])}
