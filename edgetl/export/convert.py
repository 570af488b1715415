"""The TFLite converter job: what the parent asks of :mod:`edgetl.export.tflite_process`, typed, and
the child process that does it (TensorFlow and onnx2tf stay out of the parent; their chatter goes to
``export.log``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edgetl.errors import ExportError, raise_if_interrupted
from edgetl.subproc import run_child


@dataclass(frozen=True)
class ConverterJob:
    """One run of the converter process. Its outputs land in ``workdir``."""

    workdir: str
    graph: bool = False  # convert the direct route's graph.npz (edgetl.export.tf_graph) to model_float32.tflite
    onnx: str | None = None  # or convert this ONNX file with onnx2tf
    int8: bool = False  # full-integer int8 model, calibrated on ``calibration``
    int16x8: bool = False  # 16-bit activations, 8-bit weights (a remedy)
    calibration: str | None = None  # uint8 NHWC images (.npy)
    output: str | None = None  # file name of the quantised model (default model_<mode>.tflite)
    diagnose: bool = False  # per-layer quantisation error (layer_stats.csv)
    bias_correction: bool = False
    float_model: str | None = None  # the float model bias correction pairs with (default: workdir's)
    calibration_workers: int | None = None  # processes calibrating int8 (default: 2 on a multi-core machine)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ConverterJob:
        values = json.loads(text)
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def run_converter(job: ConverterJob, log_path: Path) -> dict[str, Any]:
    """Run the job in a child process that dies with this one; its output is appended to ``log_path``.

    Returns:
        The child's report: timings and, per quantised model, the bias correction and calibration split.

    Raises:
        ExportError: the conversion failed (the last line of the log says why).
    """
    return run_converters([job], log_path)[-1]


def run_converters(jobs: list[ConverterJob], log_path: Path) -> list[dict[str, Any]]:
    """:func:`run_converter` for several jobs in one child process (TensorFlow starts once): their reports."""
    job_paths = []
    for job in jobs:
        job_paths.append(str(Path(job.workdir) / "job.json"))
        Path(job_paths[-1]).write_text(job.to_json())
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log_file:
        proc = run_child([sys.executable, "-m", "edgetl.export.tflite_process", *job_paths],
                         stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)  # fmt: skip
        log_file.write(proc.stdout)
    raise_if_interrupted()  # Ctrl-C reached the child too, or Python lost it while forking
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise ExportError(
            f"TFLite conversion failed (exit {proc.returncode}): {tail[0][:300]}",
            hint=f"the full log is in {log_path}",
        )
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")] or [{}]
