"""Run a ``.tflite`` classifier with the LiteRT interpreter: quantise the input, dequantise the output.

Works for full-integer models (uint8 or int8 input), float models and third-party models. Used on the
device and by the host's parity check, so both call the model the same way.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .modelfile import ModelFileError, check_tflite


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[None]:
    """Keep C++ chatter (e.g. "INFO: Created TensorFlow Lite XNNPACK delegate") off the terminal.

    File descriptor 2 goes to a temporary file for the duration; if the block raises, what was
    captured is written back to stderr so that real errors are not lost.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. under a test runner's capture)
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load_interpreter_class():
    """LiteRT's interpreter, falling back to tflite-runtime on devices that only have that."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise ImportError(
                "no TFLite interpreter: pip install ai-edge-litert (or tflite-runtime)"
            ) from None
    return Interpreter


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape, dtype and (scale, zero_point) of a model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @classmethod
    def from_details(cls, details: dict[str, Any]) -> TensorSpec:
        scale, zero_point = details.get("quantization", (0.0, 0))
        return cls(
            name=str(details["name"]),
            shape=tuple(int(d) for d in details["shape"]),
            dtype=np.dtype(details["dtype"]).name,
            scale=float(scale),
            zero_point=int(zero_point),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "scale": self.scale, "zero_point": self.zero_point}  # fmt: skip


def integer_input(pixels: np.ndarray, dtype: str) -> np.ndarray:
    """uint8 RGB pixels -> a uint8 (as they are) or int8 (pixels - 128) model input, any leading shape."""
    if dtype == "uint8":
        return pixels
    if dtype == "int8":
        return (pixels.astype(np.int16) - 128).astype(np.int8)
    raise ValueError(f"not an 8-bit integer input: {dtype}")


class TFLiteClassifier:
    """A single-input, single-output image classifier in a ``.tflite`` file.

    Args:
        path: the model file.
        num_threads: interpreter threads.
        pixel_range: the float range the model's float input expects for pixels 0..255. edgetl's
            models normalise inside the graph and take (0, 255); third-party float models often
            take (0, 1) or (-1, 1).
    """

    def __init__(self, path: str, num_threads: int = 1, pixel_range: tuple[float, float] = (0.0, 255.0),
                 delegate: str | None = None):  # fmt: skip
        interpreter_class = load_interpreter_class()
        self.path = str(path)
        check_tflite(self.path)  # a truncated file would crash the interpreter (SIGSEGV), not raise
        delegates = [load_edgetpu_delegate()] if delegate == "edgetpu" else None
        with native_stderr_captured():
            self.interpreter = interpreter_class(model_path=self.path, num_threads=num_threads,
                                                 experimental_delegates=delegates)  # fmt: skip
            self.interpreter.allocate_tensors()
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{path}: expected 1 input and 1 output, got {len(inputs)} and {len(outputs)}")
        self._input, self._output = inputs[0], outputs[0]
        self.input = TensorSpec.from_details(self._input)
        self.output = TensorSpec.from_details(self._output)
        if len(self.input.shape) != 4 or self.input.shape[3] != 3:
            raise ValueError(f"{path}: expected an NHWC RGB input, got shape {self.input.shape}")
        self.pixel_range = pixel_range

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input.shape[1], self.input.shape[2]

    @property
    def num_classes(self) -> int:
        return self.output.shape[-1]

    def to_input(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB pixels ``[H, W, 3]`` -> the model's input tensor ``[1, H, W, 3]``.

        Integer inputs of image models live in the pixel domain: a uint8 input takes the pixels as
        they are, whatever float range its quantisation maps them to (edgetl's: 0..255 with the
        normalisation inside; Coral's: -1..1); an int8 input takes pixels - 128. Only float inputs
        are scaled, to ``pixel_range``.
        """
        batch = pixels[None]
        dtype = self.input.dtype
        if dtype in ("uint8", "int8"):
            return integer_input(batch, dtype)
        low, high = self.pixel_range
        real = batch.astype(np.float32) * ((high - low) / 255.0) + low
        if dtype == "float32":
            return real
        if dtype == "int16" and self.input.scale > 0:  # 16-bit activations: quantise the real range
            quantised = np.round(real / self.input.scale) + self.input.zero_point
            return np.clip(quantised, -32768, 32767).astype(np.int16)
        raise ValueError(f"{self.path}: unsupported input dtype {dtype}")

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        """Run one prepared input tensor; return float32 scores ``[num_classes]`` (dequantised)."""
        self.interpreter.set_tensor(self._input["index"], tensor)
        self.interpreter.invoke()
        raw = self.interpreter.get_tensor(self._output["index"])[0]
        if self.output.dtype in ("int8", "uint8", "int16"):
            return (raw.astype(np.float32) - self.output.zero_point) * self.output.scale
        return raw.astype(np.float32)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB pixels at the model's input size -> float32 scores."""
        return self.invoke(self.to_input(pixels))


class ONNXClassifier:
    """The same interface for a float ONNX model (input float RGB 0..255, NCHW) on onnxruntime."""

    def __init__(self, path: str, num_threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.log_severity_level = 3
        self.path = str(path)
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's errors are multi-line C++ messages
            detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ModelFileError(f"{self.path} is not a usable ONNX model: {detail[:300]}") from None
        tensor = self.session.get_inputs()[0]
        self._name = tensor.name
        shape = tuple(int(d) for d in tensor.shape)
        self.input = TensorSpec(tensor.name, shape, "float32", 0.0, 0)
        out = self.session.get_outputs()[0]
        self.output = TensorSpec(out.name, tuple(int(d) for d in out.shape), "float32", 0.0, 0)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input.shape[2], self.input.shape[3]

    @property
    def num_classes(self) -> int:
        return self.output.shape[-1]

    def to_input(self, pixels: np.ndarray) -> np.ndarray:
        return pixels[None].transpose(0, 3, 1, 2).astype(np.float32)

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._name: tensor})[0][0].astype(np.float32)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.invoke(self.to_input(pixels))


EDGETPU_LIBRARY = {"linux": "libedgetpu.so.1", "darwin": "libedgetpu.1.dylib", "win32": "edgetpu.dll"}


class DelegateError(RuntimeError):
    """An accelerator delegate could not be loaded."""


def load_edgetpu_delegate():
    """The Coral Edge TPU delegate, or a DelegateError that says what to install or plug in."""
    try:
        from ai_edge_litert.interpreter import load_delegate
    except ImportError:
        from tflite_runtime.interpreter import load_delegate
    library = EDGETPU_LIBRARY.get(sys.platform, EDGETPU_LIBRARY["linux"])
    detail = ""
    with native_stderr_captured():
        try:
            return load_delegate(library)
        except (OSError, ValueError, RuntimeError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        gc.collect()  # LiteRT's half-built Delegate complains from __del__: keep that off the terminal
    raise DelegateError(
        f"cannot load the Edge TPU delegate ({library}): {detail} — install the runtime "
        "(apt install libedgetpu1-std) and check that the accelerator is plugged in"
    )


def predict_all(model, images: np.ndarray) -> np.ndarray:
    """float32 scores ``[N, classes]`` of a classifier (:func:`open_model`) on uint8 images ``[N, H, W, 3]``."""
    return np.asarray([model.predict(image) for image in images], np.float32)


def open_model(path: str, num_threads: int = 1, delegate: str | None = None):
    """A classifier for a ``.tflite`` or ``.onnx`` file (``delegate="edgetpu"`` for a compiled model)."""
    if str(path).endswith(".onnx"):
        return ONNXClassifier(path, num_threads)
    return TFLiteClassifier(path, num_threads, delegate=delegate)
