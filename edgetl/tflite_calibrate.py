"""int8 calibration on two cores: a helper process calibrates part of the images while the converter
calibrates the rest, and their ranges are merged.

TFLiteConverter calibrates by running the float model once per image in TFLite's calibration
interpreter, on one thread and holding the GIL (threads do not help): 16 s of a 224x224 MobileNetV2
export on 320 images, with the machine's other core idle. The ranges it records are each tensor's
minimum and maximum over all images, so calibrating two halves and taking the minimum of the minima and
the maximum of the maxima gives the same ranges, and the same quantised model, byte for byte (tested).

The converter (:mod:`edgetl.tflite_convert`) starts the helper first (``python -m
edgetl.tflite_calibrate``: it imports TensorFlow while the float model converts), then quantises inside
:func:`split_calibration`, which hands the helper the model to calibrate when TensorFlow's calibrator
is reached. If the helper fails, the converter calibrates its part itself: slower, same result.
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


def merge_ranges(first: bytes, second: bytes) -> bytes:
    """Two calibrated copies of one model (TFLite's calibrator output) as one: per tensor, the smaller
    minimum and the larger maximum."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    trees = [schema.ModelT.InitFromObj(schema.Model.GetRootAs(m, 0)) for m in (first, second)]
    for graph, other in zip(trees[0].subgraphs, trees[1].subgraphs, strict=True):
        for tensor, twin in zip(graph.tensors, other.tensors, strict=True):
            a, b = tensor.quantization, twin.quantization
            if a is not None and b is not None and a.min is not None and b.min is not None:
                a.min, a.max = np.minimum(a.min, b.min), np.maximum(a.max, b.max)
            elif b is not None and b.min is not None:  # only the second part saw this tensor
                tensor.quantization = b
    return bytes(flatbuffer_utils.convert_object_to_bytearray(trees[0]))


def _samples(images: np.ndarray) -> Iterator[list[np.ndarray]]:
    for image in images:
        yield [image[None].astype(np.float32)]


class Helper:
    """The helper process, started before it is needed (see the module docstring)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgetl.tflite_calibrate"],
            stdin=subprocess.PIPE, stdout=sys.stderr, stderr=sys.stderr, text=True,  # its noise: export.log
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
def split_calibration(helper: Helper, rest: np.ndarray) -> Iterator[dict]:
    """While inside, TensorFlow's calibrator also has ``helper`` calibrate on ``rest`` (the images the
    converter's own representative dataset leaves out) and merges the two. Yields a dict that gets the
    seconds spent and whether the helper did its part."""
    from tensorflow.lite.python.optimize import calibrator

    original = calibrator.Calibrator.calibrate
    record: dict = {"helper_images": int(len(rest))}

    def calibrate(self, dataset_gen):
        started = time.perf_counter()
        output = helper.start(self._model_content, rest)
        mine = original(self, dataset_gen)
        theirs = helper.finish(output)
        if theirs is None:
            record["helper_failed"] = True
            theirs = original(calibrator.Calibrator(self._model_content), lambda: _samples(rest))
        merged = merge_ranges(mine, theirs)
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
    calibrated = calibrator.Calibrator(Path(job["model"]).read_bytes()).calibrate(lambda: _samples(images))
    partial = Path(job["output"] + ".part")
    partial.write_bytes(calibrated)
    os.replace(partial, job["output"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
