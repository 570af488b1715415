"""The classifier a bundle or a plain model makes, and what the device commands share: exit codes, errors,
the --threads rule. numpy and the runtime's own modules only."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import BundleError, open_bundle
from .model import DelegateError, open_model
from .preprocess import PreprocessSpec, prepare

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY, EXIT_INTERRUPTED = 0, 1, 2, 6, 130


class RuntimeFailure(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


@dataclass
class Classifier:
    """A model, its labels and its preprocessing: RGB frame in, ranked labels out."""

    model: object
    labels: list[str]
    spec: PreprocessSpec
    outputs_probabilities: bool  # False: logits, softmax is applied
    skip_index: int | None = None  # a "background" class never reported

    def classify(self, rgb: np.ndarray, top_k: int) -> tuple[list[dict], dict[str, float]]:
        t0 = time.perf_counter()
        tensor = self.model.to_input(prepare(rgb, self.spec))
        t1 = time.perf_counter()
        scores = self.model.invoke(tensor)
        t2 = time.perf_counter()
        probs = scores if self.outputs_probabilities else _softmax(scores)
        order = [int(i) for i in np.argsort(-probs) if i != self.skip_index][:top_k]
        top = [{"label": self.labels[i], "index": i, "score": round(float(probs[i]), 5)} for i in order]
        t3 = time.perf_counter()
        timings = {"preprocess_ms": (t1 - t0) * 1e3, "invoke_ms": (t2 - t1) * 1e3, "postprocess_ms": (t3 - t2) * 1e3}
        return top, timings


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


def load_classifier(source: str, threads: int | None, labels: str | None, background: bool,
                    crop_fraction: float, pixel_range: str) -> Classifier:  # fmt: skip
    """A bundle folder (verified, preprocessing from its manifest) or a plain .tflite/.onnx file."""
    path = Path(source)
    if path.is_dir():
        try:
            bundle = open_bundle(path)
        except BundleError as exc:
            raise RuntimeFailure(str(exc), EXIT_VERIFY if "verification" in str(exc) else EXIT_ERROR) from None
        try:
            model = open_model(str(bundle.model_path), threads or bundle.threads, delegate=bundle.delegate)
        except DelegateError as exc:
            raise RuntimeFailure(str(exc), EXIT_ERROR) from None
        names, spec, probabilities = bundle.labels, bundle.preprocess, False
        for warning in bundle.warnings():
            print(f"edgetl-runtime: WARNING: {warning}", file=sys.stderr)
    elif path.is_file() and path.suffix in (".tflite", ".onnx"):
        if labels is None:
            raise RuntimeFailure(f"{path} is a plain model: give --labels FILE (one label per line)", EXIT_USAGE)
        low, high = (float(v) for v in pixel_range.split(","))
        model = open_model(str(path), threads or 1)
        if hasattr(model, "pixel_range"):
            model.pixel_range = (low, high)
        names = Path(labels).read_text().splitlines()
        size = model.image_size[0]
        spec = PreprocessSpec(image_size=size, resize_size=max(size, round(size / crop_fraction)))
        probabilities = None  # decided from the outputs below
    else:
        raise RuntimeFailure(f"{source} is neither a bundle folder nor a .tflite/.onnx file")
    skip = None
    if len(names) == model.num_classes - 1:
        names, skip = ["background", *names], 0  # labels without the model's background class
    elif len(names) != model.num_classes:
        raise RuntimeFailure(f"model has {model.num_classes} outputs but there are {len(names)} labels")
    if background:
        skip = 0
    if probabilities is None:
        out = model.output
        if out.dtype in ("uint8", "int8"):
            # TFLite quantises a softmax output with scale 1/256 and zero point 0 (uint8) / -128 (int8).
            probabilities = abs(out.scale - 1 / 256) < 1e-9 and out.zero_point == (0 if out.dtype == "uint8" else -128)
        else:
            probe = model.invoke(model.to_input(np.full((*model.image_size, 3), 128, np.uint8)))
            probabilities = bool(probe.min() >= 0 and abs(float(probe.sum()) - 1.0) < 1e-3)
    return Classifier(model, names, spec, probabilities, skip)


class UsageError(Exception):
    """A bad command line (exit 2)."""


def max_threads() -> int:
    """The most threads a --threads option takes: 4 per CPU of this machine, at least 64 (beyond, OpenMP
    and XNNPACK fail in their own way: libgomp's "Out of memory" and an abort)."""
    return max(64, 4 * (os.cpu_count() or 1))


def too_many_threads(count: int) -> str | None:
    """Why ``count`` threads are refused (None: they are not): more than :func:`max_threads`."""
    if count <= max_threads():
        return None
    return f"{count} is more than {max_threads()} (4 per CPU of this machine, at least 64)"


def thread_count(value: str, option: str) -> int:
    """A --threads value: a whole number from 1 to :func:`max_threads`."""
    number = positive_int(value, option)
    refused = too_many_threads(number)
    if refused:
        raise UsageError(f"{option} {refused}")
    return number


def positive_int(value: str, option: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UsageError(f"{option} expects a positive integer, got {value!r}")
    return number
