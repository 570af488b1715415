"""``model.onnx``: batch 1, static shape, input ``pixels`` (float RGB 0..255, NCHW), output ``logits``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def export_onnx(model: Any, image_size: int, path: Path, opset: int) -> None:
    """Write ``model`` as ONNX and check it with ``onnx.checker`` (full check)."""
    import warnings

    import onnx
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
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
