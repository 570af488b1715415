"""TensorFlow -> TFLite conversion, run in its own process by :func:`edgetl.export.convert.run_converter`.

TensorFlow and onnx2tf are loud (C++ logs on file descriptor 2) and heavy; running them in a child
process keeps the noise in ``export.log`` and TensorFlow out of the parent. Usage::

    python -m edgetl.export.tflite_process JOB.json

JOB.json is an :class:`edgetl.export.convert.ConverterJob`. The float model comes from the workdir's
``graph.npz`` with ``graph`` (:mod:`edgetl.export.tf_graph`, the default route) or from ``onnx``
through onnx2tf (a SavedModel in ``tf/``); a job with neither re-quantises the float model of an
earlier job. When the workdir also holds ``graph_int8.npz`` (the int8 model's own weights: ranges
equalised, :func:`edgetl.quantize.equalize.equalize_for_int8`, and in a QAT run the quantisation-aware
weights, :mod:`edgetl.quantize.qat`), the quantised models are made from that graph instead, and bias
correction, if asked for, pairs them with that graph's own float model.
Every model is written through :func:`edgetl.export.tflite_dedup.compact` (repeated quantisation vectors
stored once, buffers aligned). Outputs in workdir: ``model_float32.tflite``, the quantised model(s) and,
with "diagnose", ``layer_stats.csv`` (per-layer quantisation error). Prints one JSON line on
stdout last: timings and, per quantised model, the bias correction applied and how its calibration
was split between processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgetl.subproc import die_with_parent

# The direct route's float model (see edgetl.export.tf_graph), written by the export into the workdir.
GRAPH = "graph.npz"
# The int8 model's own weights (edgetl.quantize.equalize, edgetl.quantize.qat), when the export writes them: quantised
# models come from it.
GRAPH_INT8 = "graph_int8.npz"
# onnx2tf downloads this sample file unless it is in its working directory. edgetl never uses it
# (int8 calibration is done below on the run's own images), so a small stand-in keeps it offline.
ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def run_onnx2tf(onnx_path: Path, workdir: Path) -> Path:
    """Convert with the onnx2tf CLI; return the SavedModel folder."""
    import numpy as np

    np.save(workdir / ONNX2TF_SAMPLE, np.zeros((20, 128, 128, 3), np.float32))
    bin_dir = Path(sys.executable).parent
    exe = bin_dir / "onnx2tf"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "onnx2tf"]
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    out = workdir / "tf"
    # -osd: signatures, needed by TFLiteConverter.from_saved_model. No -coion (it needs flatc).
    command += ["-i", str(onnx_path), "-o", str(out), "-osd", "-n"]
    print("$", " ".join(command), flush=True)
    proc = subprocess.run(command, cwd=workdir, env=env, stdout=sys.stdout, stderr=sys.stderr,
                          preexec_fn=die_with_parent())  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"onnx2tf failed with exit code {proc.returncode}")
    return out


def converter_factory(workdir: Path, name: str = GRAPH) -> Callable[[], Any]:
    """A function returning a fresh TFLiteConverter for the workdir's float model (graph ``name``)."""
    import tensorflow as tf

    graph = workdir / name
    if graph.is_file():
        from edgetl.export.tf_graph import build

        function, owner = build(graph), tf.Module()
        return lambda: tf.lite.TFLiteConverter.from_concrete_functions([function], owner)
    return lambda: tf.lite.TFLiteConverter.from_saved_model(str(workdir / "tf"))


def quantize(
    make_converter: Callable[[], Any], calibration: Path, mode: str, helper: Any = None, stats: dict | None = None
) -> bytes:
    """Full-integer conversion calibrated on ``calibration`` (uint8 NHWC images).

    ``mode`` "int8": int8 weights and activations, uint8 input, int8 output.
    ``mode`` "int16x8": int16 activations, int8 weights (a remedy, not "int8").
    ``helper``: a :class:`edgetl.quantize.calibrate.Helper` that calibrates half of the images of an int8
    conversion in parallel (same model, see that module); ``stats`` gets how the calibration was split.
    """
    from contextlib import nullcontext

    import numpy as np
    import tensorflow as tf

    from edgetl.quantize.calibrate import calibration_samples, controlled_calibration

    images = np.load(calibration).copy()
    mine = len(images)
    if mode == "int8":
        # The uint8 input takes raw pixels only if its quantisation is scale 1 / zero point 0, i.e. if its
        # calibrated range is exactly 0..255, whatever the images span: set in the calibrated model.
        if helper is not None and len(images) > 1:
            mine = len(images) // 2
        split = controlled_calibration(helper, images[mine:], input_range=(0.0, 255.0))
    else:
        # int16x8 (TFLite's other quantiser, which calibrates again itself): the input is quantised by
        # the runtime, so its range only needs to span every pixel value; one black and one white
        # pixel make sure of it.
        images[0, 0, 0, :] = 0
        images[0, 0, 1, :] = 255
        split = nullcontext()

    converter = make_converter()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: calibration_samples(images[:mine])
    if mode == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.int8
    else:
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
        converter.inference_input_type = tf.int16
        converter.inference_output_type = tf.int16
    with split as record:
        model = converter.convert()
    if stats is not None:
        stats.update(record or {"helper_images": 0}, images=int(len(images)))
    return model


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def correct_bias(model: bytes, float_model: str, calibration: Path, mode: str = "int8") -> tuple[bytes, dict]:
    """Bias-correct a quantised model (see :mod:`edgetl.quantize.bias_correction`): every layer's expected
    weight-rounding error; then what the activations leave, for an int8 model every layer's in execution
    order or the output layer's, whichever does best on held-out calibration images, for an int16x8
    model (XNNPACK cannot run it) the output layer's. Unchanged where it cannot be corrected."""
    import numpy as np

    from edgetl.quantize.activation_correction import correct_activations, correct_output
    from edgetl.quantize.bias_correction import NotCorrectable, correct

    images = np.load(calibration)
    try:
        model, summary = correct(model, float_model, images)
    except NotCorrectable as exc:
        print(f"bias correction skipped: {exc}", file=sys.stderr, flush=True)
        return model, {"skipped": str(exc)}
    key = "activations" if mode == "int8" else "output_layer"
    try:
        if mode == "int8":
            model, summary[key] = correct_activations(model, float_model, images, threads=_cores())
        else:
            model, summary[key] = correct_output(model, float_model, images)
    except NotCorrectable as exc:
        print(f"{key.replace('_', ' ')} bias correction skipped: {exc}", file=sys.stderr, flush=True)
        summary[key] = {"skipped": str(exc)}
    return model, summary


def diagnose(make_converter: Callable[[], Any], calibration: Path, csv_path: Path) -> None:
    """Per-layer float-vs-int8 error with TFLite's QuantizationDebugger, dumped as CSV."""
    import numpy as np
    import tensorflow as tf

    from edgetl.quantize.calibrate import calibration_samples

    images = np.load(calibration)

    def dataset():
        return calibration_samples(images[:32])

    converter = make_converter()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=dataset)
    debugger.run()
    with open(csv_path, "w") as fh:
        debugger.layer_statistics_dump(fh)


def write_model(path: Path, model: bytes) -> None:
    from edgetl.export.tflite_dedup import compact

    path.write_bytes(compact(model))


def main(*job_paths: str) -> int:
    """Run each job in turn (one TensorFlow start for several: a search's shape probes); each prints its
    report line. Stops at the first job that fails."""
    for job_path in job_paths:
        code = _run_job(job_path)
        if code:
            return code
    return 0


def _run_job(job_path: str) -> int:
    from edgetl.export.convert import ConverterJob

    job = ConverterJob.from_json(Path(job_path).read_text())
    workdir = Path(job.workdir)
    workers = job.calibration_workers if job.calibration_workers is not None else (2 if _cores() > 1 else 1)
    helper = None
    if job.int8 and workers > 1:
        from edgetl.quantize.calibrate import Helper

        helper = Helper(workdir)  # starts importing TensorFlow now, in parallel with this process
    try:
        return _convert(job, workdir, helper)
    finally:
        if helper is not None:
            helper.close()


def _convert(job: Any, workdir: Path, helper: Any) -> int:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if job.onnx:
        saved_model = run_onnx2tf(Path(job.onnx), workdir)
        produced = saved_model / f"{Path(job.onnx).stem}_float32.tflite"
        write_model(workdir / "model_float32.tflite", produced.read_bytes())
        produced.unlink()
        timings["onnx2tf_s"] = time.perf_counter() - t0
    make_converter = converter_factory(workdir)  # a remedy re-quantises the float model of an earlier job
    make_int8_converter, int8_float_model = make_converter, None
    if (workdir / GRAPH_INT8).is_file():
        make_int8_converter = converter_factory(workdir, GRAPH_INT8)
        int8_float_model = workdir / "model_int8_weights_float32.tflite"
    if job.graph:
        write_model(workdir / "model_float32.tflite", make_converter().convert())
        timings["tflite_float_s"] = time.perf_counter() - t0
    corrections, calibration = {}, {}
    for mode in ("int8", "int16x8"):
        if getattr(job, mode):
            t0 = time.perf_counter()
            model = quantize(make_int8_converter, Path(job.calibration), mode,
                             helper if mode == "int8" else None, calibration.setdefault(mode, {}))  # fmt: skip
            timings[f"{mode}_s"] = time.perf_counter() - t0
            if job.bias_correction:
                t0 = time.perf_counter()
                float_model = job.float_model or str(workdir / "model_float32.tflite")
                if int8_float_model is not None:  # the float model of the weights being quantised
                    if not int8_float_model.is_file():
                        int8_float_model.write_bytes(make_int8_converter().convert())
                    float_model = str(int8_float_model)
                model, corrections[mode] = correct_bias(model, float_model, Path(job.calibration), mode)
                timings[f"{mode}_bias_correction_s"] = time.perf_counter() - t0
            write_model(workdir / (job.output or f"model_{mode}.tflite"), model)
    if job.diagnose:
        t0 = time.perf_counter()
        diagnose(make_int8_converter, Path(job.calibration), workdir / "layer_stats.csv")
        timings["diagnose_s"] = time.perf_counter() - t0
    print(json.dumps({"timings": timings, "bias_correction": corrections, "calibration": calibration}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
