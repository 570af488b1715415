"""int8 calibration on two cores: a helper process calibrates part of the images while the converter
calibrates the rest, and their ranges are merged.

TFLiteConverter calibrates by running the float model once per image in TFLite's calibration
interpreter, on one thread and holding the GIL (threads do not help): 16 s of a 224x224 MobileNetV2
export on 320 images, with the machine's other core idle. The ranges it records are each tensor's
minimum and maximum over all images, so calibrating two halves and taking the minimum of the minima and
the maximum of the maxima gives the same ranges, and the same quantised model, byte for byte (tested).

The converter (:mod:`edgetl.export.tflite_process`) starts the helper first (``python -m
edgetl.quantize.calibrate``: it imports TensorFlow while the float model converts), then quantises inside
:func:`controlled_calibration`, which hands the helper the model to calibrate when TensorFlow's
calibrator is reached (and sets the input's range: see there). If the helper fails, the converter
calibrates its part itself: slower, same result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgetl.subproc import die_with_parent


def merge_ranges(first: bytes, second: bytes | None = None, input_range: tuple[float, float] | None = None) -> bytes:
    """Calibrated copies of one model (TFLite's calibrator output) as one: per tensor, the smaller minimum
    and the larger maximum; with ``input_range``, the model input's range set to it."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAs(first, 0))
    if second is not None:
        other = schema.ModelT.InitFromObj(schema.Model.GetRootAs(second, 0))
        for graph, twin_graph in zip(tree.subgraphs, other.subgraphs, strict=True):
            for tensor, twin in zip(graph.tensors, twin_graph.tensors, strict=True):
                a, b = tensor.quantization, twin.quantization
                if a is not None and b is not None and a.min is not None and b.min is not None:
                    a.min, a.max = np.minimum(a.min, b.min), np.maximum(a.max, b.max)
                elif b is not None and b.min is not None:  # only the second part saw this tensor
                    tensor.quantization = b
    if input_range is not None:
        graph = tree.subgraphs[0]
        tensor = graph.tensors[graph.inputs[0]]
        if tensor.quantization is None:
            tensor.quantization = schema.QuantizationParametersT()
        tensor.quantization.min = np.array([input_range[0]], np.float32)
        tensor.quantization.max = np.array([input_range[1]], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def calibration_samples(images: np.ndarray) -> Iterator[list[np.ndarray]]:
    """TFLite's representative dataset for uint8 NHWC ``images``: one float32 batch of one per image."""
    for image in images:
        yield [image[None].astype(np.float32)]


class Helper:
    """The helper process, started before it is needed (see the module docstring)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgetl.quantize.calibrate"],
            stdin=subprocess.PIPE, stdout=sys.stderr, stderr=sys.stderr, text=True,  # its noise: export.log
            preexec_fn=die_with_parent(),
        )  # fmt: skip

    def start(self, model: bytes, images: np.ndarray) -> Path:
        """Send it ``model`` (TFLite's calibration input) to calibrate on ``images``; returns where the
        calibrated model will be."""
        job = {"model": str(self.workdir / "calibrate_in.tflite"), "images": str(self.workdir / "calibrate_in.npy"),
               "output": str(self.workdir / "calibrated_part.tflite")}  # fmt: skip
        Path(job["model"]).write_bytes(model)
        np.save(job["images"], images)
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.close()
        return Path(job["output"])

    def finish(self, output: Path) -> bytes | None:
        """The helper's calibrated model, or None (reported on stderr) if it failed."""
        self.proc.wait()
        if self.proc.returncode != 0 or not output.is_file():
            print(f"calibration helper failed (exit {self.proc.returncode}); calibrating in one process",
                  file=sys.stderr, flush=True)  # fmt: skip
            return None
        return output.read_bytes()

    def close(self) -> None:
        """Stop a helper that was never used (closing its input ends it)."""
        if self.proc.poll() is None:
            if not self.proc.stdin.closed:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def controlled_calibration(
    helper: Helper | None, rest: np.ndarray, input_range: tuple[float, float] | None = None
) -> Iterator[dict]:
    """While inside, TensorFlow's calibrator also has ``helper`` calibrate on ``rest`` (the images the
    converter's own representative dataset leaves out; none: no helper) and merges the two, and sets the
    model input's range to ``input_range``. Yields a dict that gets the seconds spent and whether the
    helper did its part.

    ``input_range`` (0, 255) gives a uint8 input scale 1 and zero point 0, i.e. raw pixels, whatever
    the calibration images span; forcing it through the images instead (a black and a white pixel in one
    of them, as edgetl did before) also made the stem see a sharp edge no real image has, and widened its
    int8 range from the images' 2.7 to 6 on the sign-language run.
    """
    from tensorflow.lite.python.optimize import calibrator

    original = calibrator.Calibrator.calibrate
    record: dict = {"helper_images": int(len(rest)) if helper is not None else 0}

    def calibrate(self, dataset_gen):
        started = time.perf_counter()
        theirs = None
        if helper is not None and len(rest):
            output = helper.start(self._model_content, rest)
            mine = original(self, dataset_gen)
            theirs = helper.finish(output)
            if theirs is None:
                record["helper_failed"] = True
                theirs = original(calibrator.Calibrator(self._model_content), lambda: calibration_samples(rest))
        else:
            mine = original(self, dataset_gen)
        merged = merge_ranges(mine, theirs, input_range)
        record["calibration_s"] = round(time.perf_counter() - started, 2)
        return merged

    calibrator.Calibrator.calibrate = calibrate
    try:
        yield record
    finally:
        calibrator.Calibrator.calibrate = original


def main() -> int:
    from tensorflow.lite.python.optimize import calibrator  # the slow import, done while waiting

    line = sys.stdin.readline()
    if not line.strip():
        return 0  # not needed after all
    job = json.loads(line)
    images = np.load(job["images"])
    calibrated = calibrator.Calibrator(Path(job["model"]).read_bytes()).calibrate(lambda: calibration_samples(images))
    partial = Path(job["output"] + ".part")
    partial.write_bytes(calibrated)
    os.replace(partial, job["output"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
