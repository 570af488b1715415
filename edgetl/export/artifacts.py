"""Export a fine-tuned run to ONNX and TFLite (float32 and full-integer int8), each checked for what
it claims to be.

* ``model.onnx``: torch's exporter, ``onnx.checker``, and onnxruntime against PyTorch on real
  validation images (max abs logit difference within ``float_tolerance``).
* ``model_float32.tflite``: TFLiteConverter on the model rebuilt in TensorFlow from its PyTorch
  weights (:mod:`edgetl.export.tf_graph`; or onnx2tf's conversion of the ONNX with ``converter="onnx2tf"``),
  same check.
* ``model_int8.tflite``: TFLiteConverter on that float model with a representative dataset from
  a calibration recipe; full-integer (int8 ops, per-channel weights), uint8 RGB NHWC input with scale 1
  and zero point 0 — raw pixels, normalisation inside the graph — batch 1, static shape.

TensorFlow runs in a child process (:mod:`edgetl.export.convert`) whose output goes to ``export.log``.
Artifacts are built in a work folder and moved into the run only once they passed their checks, so a
failed or interrupted export leaves nothing a later step would trust. The accuracy parity of what it
wrote is the next stage's (:mod:`edgetl.check`); :mod:`edgetl.pipeline` chains the two.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.config import ExportConfig
from edgetl.data.folders import DatasetSplits
from edgetl.data.heldout import Evaluation
from edgetl.errors import ExportError, RunDirError, raise_if_interrupted, writing_into
from edgetl.export.convert import ConverterJob, run_converter
from edgetl.rundir import ARTIFACTS, MODEL, QAT_WEIGHTS, read_manifest, run_lock, update_manifest, write_json
from edgetl.runtime.modelfile import ModelFileError
from edgetl.runtime.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

WORKDIR = ".export-work"


@dataclass
class Prepared:
    """What the conversion works from: the models, the held-out images and the calibration set."""

    run_dir: Path
    model: Any
    int8_model: Any | None  # its own weights (equalised, or QAT's); None: the float model's
    spec: PreprocessSpec
    evaluation: Evaluation
    splits: DatasetSplits | None
    calibration: Any | None  # edgetl.quantize.recipes.CalibrationSet
    equalization: list | None = None
    relu_equalization: list | None = None
    qat_weights: bool = False


@dataclass
class ExportResult:
    """What the export wrote. ``workdir`` is kept (for the int8 remedies) when not None."""

    run_dir: Path
    artifacts: dict[str, dict[str, Any]]
    calibration: dict[str, Any] | None
    timings: dict[str, float]
    evaluation: Evaluation
    splits: DatasetSplits | None
    spec: PreprocessSpec
    info: dict[str, Any] = field(default_factory=dict)  # the manifest's export record
    workdir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "artifacts": self.artifacts, "calibration": self.calibration,
                "timings": self.timings}  # fmt: skip


def tool_versions() -> dict[str, str]:
    versions = {}
    for dist in ("torch", "onnx", "onnxruntime", "onnx2tf", "onnxscript", "tensorflow", "ai-edge-litert"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def bias_correction_wanted(cfg: ExportConfig, manifest: dict[str, Any]) -> bool:
    """An explicit setting wins; then a QAT run gets none; then the recipe; a user's --calib-dir gets the
    default (on).

    QAT trained the weights against the int8 rounding it simulated, which has no bias correction; the
    correction would shift the biases QAT chose. (Re-exporting two sign-language QAT runs with and
    without it favoured leaving it off; a one-off comparison, not a kept benchmark.)
    """
    from edgetl.quantize.recipes import CalibRecipe, load_recipe

    if cfg.bias_correction is not None:
        return cfg.bias_correction
    if "qat" in manifest.get("stages", {}):
        return False
    return (load_recipe(cfg.calib) if cfg.calib_dir is None else CalibRecipe()).bias_correction


def export(run_dir: str | os.PathLike, cfg: ExportConfig = ExportConfig(), data: str | None = None,  # noqa: B008
           *, keep_workdir: bool = False) -> ExportResult:  # fmt: skip
    """Export, convert and verify a fine-tuned run, holding its lock. See the module docstring.

    Args:
        data: measure the float checks on this folder instead of the run's validation split.
        keep_workdir: keep the work folder (the converted models the int8 remedies re-quantise) when
            an int8 model was made; the caller removes ``result.workdir``.

    Raises:
        RunDirError: no fine-tuned model in ``run_dir``; RunLocked: another process writes it.
        ExportError: a conversion failed, or a float export differs from PyTorch.
        DataError, ConfigError: calibration data or recipe problems (incl. leakage).
    """
    if not (Path(run_dir) / MODEL).is_file():  # say so before the lock creates the folder
        raise RunDirError(f"{run_dir} has no {MODEL}", hint="run edgetl finetune first")
    with run_lock(run_dir, "export"):
        started = time.perf_counter()
        prepared = prepare(Path(run_dir), cfg, data)
        workdir = (prepared.run_dir / WORKDIR).resolve()  # absolute: the converter runs with its own cwd
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        try:
            with writing_into(workdir):
                produced, timings, converted = _convert(prepared, cfg, workdir)
            _install(prepared.run_dir, workdir, produced)
        except BaseException:  # failed or interrupted: nothing of it stays
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        keep = keep_workdir and cfg.int8
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        result = _record(prepared, cfg, produced, timings, converted)
        result.workdir = workdir if keep else None
        result.timings["total_s"] = time.perf_counter() - started  # edgetl.pipeline counts the parity check in
        return result


def prepare(run_dir: Path, cfg: ExportConfig, data: str | None) -> Prepared:
    """Load the models, the held-out images with the float reference, and the calibration set."""
    from edgetl.data.heldout import evaluation_set
    from edgetl.train.checkpoint import load_checkpoint
    from edgetl.train.loop import torch_logits

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
    val, description, classes, splits = evaluation_set(run_dir, manifest, data)
    reference = torch_logits(model, val.images)  # the parity check's reference too
    prepared = Prepared(run_dir, model, int8_model, spec, (val, description, classes, reference), splits, None,
                        qat_weights=int8_model is not None)  # fmt: skip
    if cfg.int8:
        _calibrate(prepared, cfg)
    return prepared


def _calibrate(prepared: Prepared, cfg: ExportConfig) -> None:
    """The calibration set (leakage-checked against the held-out images) and, with ``cfg.equalize``,
    the int8 model's equalised weights."""
    from edgetl.quantize.recipes import calibration_set, load_recipe

    splits, val = prepared.splits, prepared.evaluation[0]
    if splits is None and cfg.calib_dir is None:
        raise RunDirError("int8 calibration needs the run's training split, but --data replaced it",
                          hint="export without --data, or use --calib-dir with --data")  # fmt: skip
    recipe = load_recipe(cfg.calib) if cfg.calib_dir is None else None
    guard = splits.test if splits else []
    calibration = calibration_set(splits, prepared.spec, recipe, cfg.calib_dir, guard_samples=guard, guard_split=val)
    log.info("calibration: %d images (sha256 %s…)", len(calibration.paths), calibration.sha256[:12])
    prepared.calibration = calibration
    if not cfg.equalize:
        return
    from edgetl.quantize.equalize import equalize, equalize_for_int8

    if cfg.converter == "direct":  # the int8 model gets its own graph; the float exports are the trained model
        if prepared.int8_model is None:  # (a QAT run's weights were equalised before training and are used as
            # trained: equalising again would move the reading convolutions' int8 grids away from QAT's)
            prepared.int8_model, prepared.equalization, prepared.relu_equalization = equalize_for_int8(
                prepared.model, calibration.images)  # fmt: skip
    else:  # onnx2tf quantises the ONNX model: the exact transform only, checked against the reference below
        prepared.equalization = equalize(prepared.model, calibration.images)


def _convert(prepared: Prepared, cfg: ExportConfig,
             workdir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, float], dict[str, Any]]:  # fmt: skip
    """ONNX, then the converter process; every float model checked against PyTorch, the int8 model's
    structure checked. Returns (produced files and their facts, timings, the converter's report)."""
    from edgetl.export.onnx import export_onnx
    from edgetl.export.tool_metadata import describe_run, finish_for_tools
    from edgetl.quantize.tflite_facts import inspect_tflite

    run_dir, timings = prepared.run_dir, {}
    log_path = run_dir / "export.log"
    log_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    export_onnx(prepared.model, prepared.spec.image_size, workdir / "model.onnx", cfg.opset)
    timings["onnx_s"] = time.perf_counter() - t0
    produced = {"model.onnx": {"max_abs_logit_diff_vs_torch": _float_check(prepared, cfg, workdir / "model.onnx")}}
    job = _job(prepared, cfg, workdir)
    log.info("converting to TFLite (%s%s)…", cfg.converter, " + int8" if cfg.int8 else "")
    t0 = time.perf_counter()
    converted = run_converter(job, log_path)
    timings["converter_process_s"] = time.perf_counter() - t0  # incl. starting Python and TensorFlow
    timings.update(converted["timings"])
    about = describe_run(run_dir)  # metadata and a uint8 output: other tools load the models as they are
    finish_for_tools(workdir / "model_float32.tflite", about)
    if cfg.int8:
        finish_for_tools(workdir / "model_int8.tflite", about, cfg.int8_output)
    float_diff = _float_check(prepared, cfg, workdir / "model_float32.tflite")
    produced["model_float32.tflite"] = {"max_abs_logit_diff_vs_torch": float_diff}
    if cfg.int8:
        facts = inspect_tflite(str(workdir / "model_int8.tflite"))
        problems = facts.full_integer_problems()
        if problems:
            raise ExportError(f"the int8 model is not full-integer: {'; '.join(problems)}")
        produced["model_int8.tflite"] = {"structure": facts.to_dict()}
    return produced, timings, converted


def _job(prepared: Prepared, cfg: ExportConfig, workdir: Path) -> ConverterJob:
    """The converter job, with its inputs written into ``workdir``."""
    correct = cfg.int8 and bias_correction_wanted(cfg, read_manifest(prepared.run_dir))
    onnx = graph = None
    if cfg.converter == "onnx2tf":
        onnx = str(workdir / "model.onnx")
    else:
        from edgetl.export.tf_graph import save_graph
        from edgetl.export.tflite_process import GRAPH, GRAPH_INT8
        from edgetl.train.layers import UnsupportedModel

        try:
            save_graph(prepared.model, prepared.spec.image_size, workdir / GRAPH)
            if prepared.int8_model is not None:
                save_graph(prepared.int8_model, prepared.spec.image_size, workdir / GRAPH_INT8)
        except UnsupportedModel as exc:
            raise ExportError(f"the direct TFLite converter does not know {exc}",
                              hint="export with --converter onnx2tf") from None  # fmt: skip
        graph = True
    calibration = None
    if prepared.calibration is not None:
        np.save(workdir / "calibration.npy", prepared.calibration.images)
        calibration = str(workdir / "calibration.npy")
    return ConverterJob(workdir=str(workdir), graph=bool(graph), onnx=onnx, int8=cfg.int8,
                        bias_correction=bool(correct), calibration=calibration)  # fmt: skip


def _float_check(prepared: Prepared, cfg: ExportConfig, path: Path) -> float:
    """Max abs logit difference of a float export from PyTorch on the first validation images.

    Raises:
        ExportError: over ``cfg.float_tolerance``.
    """
    from edgetl.runtime.model import open_model, predict_all

    images, reference = prepared.evaluation[0].images, prepared.evaluation[3]
    verify, reference = images[: cfg.verify_images], reference[: cfg.verify_images]
    diff = float(np.abs(predict_all(open_model(str(path)), verify) - reference).max())
    if diff > cfg.float_tolerance:
        what = "ONNX" if path.suffix == ".onnx" else "float32 TFLite"
        raise ExportError(f"{what} logits differ from PyTorch by {diff:.2e} > {cfg.float_tolerance}")
    return diff


def _install(run_dir: Path, workdir: Path, produced: dict[str, Any]) -> None:
    """Everything passed its own checks: move it into the run, drop stale exports of earlier runs. The
    manifest forgets every earlier export and verdict first, so a run interrupted half way trusts none
    of the files it holds until :func:`_record` lists them."""
    raise_if_interrupted()
    manifest = read_manifest(run_dir)
    manifest["files"] = {name: entry for name, entry in manifest["files"].items() if name not in ARTIFACTS}
    for stage in ("export", "check"):
        manifest["stages"].pop(stage, None)
    write_json(run_dir / "manifest.json", manifest)
    for name in ARTIFACTS:
        if name not in produced:
            (run_dir / name).unlink(missing_ok=True)
    for name in produced:
        os.replace(workdir / name, run_dir / name)


def _record(prepared: Prepared, cfg: ExportConfig, produced: dict[str, Any], timings: dict[str, float],
            converted: dict[str, Any]) -> ExportResult:  # fmt: skip
    """Describe the artifacts and write the manifest's export record."""
    run_dir, calibration = prepared.run_dir, prepared.calibration
    artifacts = {name: describe(run_dir, name, extra) for name, extra in produced.items()}
    info = {
        "artifacts": artifacts,
        "calibration": calibration.description if calibration else None,
        "bias_correction": converted["bias_correction"].get("int8"),
        "int8_calibration_split": converted.get("calibration", {}).get("int8"),  # edgetl.quantize.calibrate
        "equalization": prepared.equalization,
        "relu_equalization": prepared.relu_equalization,
        "converter": cfg.converter,
        "int8_weights": QAT_WEIGHTS if prepared.qat_weights else (MODEL if cfg.int8 else None),
        "onnx_opset": cfg.opset,
        "float_tolerance": cfg.float_tolerance,
        "verified_on_images": int(min(len(prepared.evaluation[0].labels), cfg.verify_images)),
        "timings": timings,
        "versions": tool_versions(),
    }
    update_manifest(run_dir, "export", [*sorted(produced), "export.log"], info)
    return ExportResult(run_dir, artifacts, info["calibration"], timings, prepared.evaluation, prepared.splits,
                        prepared.spec, info)  # fmt: skip


def describe(run_dir: Path, name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An artifact's format, precision, size and input/output spec (and ``extra`` facts)."""
    fmt, precision = ARTIFACTS[name]
    return {"format": fmt, "precision": precision, "bytes": (run_dir / name).stat().st_size,
            **_io_spec(run_dir / name), **(extra or {})}  # fmt: skip


def _io_spec(path: Path) -> dict[str, Any]:
    if path.suffix == ".tflite":
        from edgetl.runtime.model import TFLiteClassifier

        try:
            model = TFLiteClassifier(str(path))  # checks the flatbuffer before mapping it
        except ModelFileError as exc:
            raise RunDirError(str(exc), hint="export the run again") from None
        return {"input": model.input.to_dict(), "output": model.output.to_dict()}
    import onnx

    graph = onnx.load(str(path)).graph

    def spec(value: Any) -> dict[str, Any]:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        return {"name": value.name, "shape": dims, "dtype": "float32"}

    return {"input": spec(graph.input[0]), "output": spec(graph.output[0])}
