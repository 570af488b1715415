"""Run an exported model file over a batch of images, through the device runtime's own model classes
(:mod:`edgetl.runtime.model`), after checking that the file is a whole model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgetl.errors import RunDirError, first_line
from edgetl.runtime.modelfile import ModelFileError


def runner_for(path: Path, num_threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A function from uint8 NHWC images to float32 logits ``[N, classes]`` for a .tflite or .onnx file.

    Raises:
        RunDirError: the file is not a whole, loadable model (truncated, empty, garbage).
    """
    from edgetl.runtime.model import open_model, predict_all

    try:
        if path.suffix == ".onnx":
            import onnx

            onnx.checker.check_model(str(path))  # onnxruntime may crash on a broken file instead of raising
        model = open_model(str(path), num_threads)  # a .tflite is checked whole before it is mapped
    except (ModelFileError, *_onnx_errors()) as exc:
        raise RunDirError(f"{path} is not a usable model: {first_line(exc)}", hint="export the run again") from None

    return lambda images: predict_all(model, images)


def _onnx_errors() -> tuple[type[BaseException], ...]:
    """What onnx raises for an unreadable model file."""
    import onnx
    from google.protobuf.message import DecodeError

    return (onnx.checker.ValidationError, DecodeError, ValueError)
