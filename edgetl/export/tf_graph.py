"""A fine-tuned MobileNetV2 rebuilt as a TensorFlow graph, straight from its PyTorch weights.

edgetl's models are one known architecture, so the TFLite conversion needs no generic ONNX -> TF
translator: :func:`graph_spec` (PyTorch side) walks the model into a list of layers with the
BatchNorms folded into their convolutions (in float64, then float32) and saves it as one ``.npz``;
:func:`build` (TensorFlow side, in the converter's process) turns that file into a ``tf.function``
with NHWC input ``[1, H, W, 3]`` (float pixels 0..255) that ``TFLiteConverter`` converts directly.
The export checks the result against PyTorch like any other artifact (max abs logit difference).

The normalisation ``x * (1 / std) + (-mean / std)`` becomes one 1x1 depthwise convolution with a bias,
not a broadcast MUL and ADD: LiteRT runs those two on a [1, 224, 224, 3] tensor outside XNNPACK's fast
paths (innermost dimension 3), and in the int8 model they took 0.75 of its 2.27 ms on the benchmark
machine (``benchmarks/results/op_latency_cut_sign_language.md``); as a convolution the whole int8 model
runs in 1.68 ms (``benchmarks/results/export_bench_sign_language_cpu.md``).
Its int8 weights are exact (one weight per channel quantises to 127), so the int8 graph keeps one
rounding there (the normalised input) where it had two.

On a 2-core machine this takes a few seconds where onnx2tf takes about a minute (see
``benchmarks/export_bench.py``); onnx2tf stays available as ``edgetl export --converter onnx2tf``.
A model this walker does not know raises :class:`UnsupportedModel` naming the module.

Layer records (JSON in the file's ``spec`` entry; arrays by name):
``{"op": "normalize", "scale": a, "offset": b}`` (x * scale + offset per channel),
``{"op": "conv", "w": a, "b": a, "stride": s, "pad": p, "depthwise": bool, "act": null|"relu"|"relu6"}``,
``{"op": "block", "residual": bool, "layers": [...]}``, ``{"op": "mean"}``, ``{"op": "dense", "w": a, "b": a}``;
each also has a "name", the PyTorch module's path (``features.2.conv.0.0``), which scopes its TF ops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.train.layers import UnsupportedModel, fold, walk  # noqa: F401 - UnsupportedModel: what build raises


def graph_spec(model: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Walk an :class:`~edgetl.train.model.EdgeClassifier` (eval mode) into layer records and arrays."""
    import torch

    arrays: dict[str, np.ndarray] = {}

    def array(value: Any) -> str:
        name = f"a{len(arrays)}"
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        arrays[name] = np.ascontiguousarray(value, dtype=np.float32)
        return name

    def record(layer: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in layer.items() if k not in ("conv", "bn", "linear", "layers")}
        if layer["op"] == "conv":
            weight, bias = fold(layer["conv"], layer["bn"], torch.float64)  # [out, in / groups, kh, kw]
            # TF layouts: HWIO for a convolution, [kh, kw, channels, 1] for a depthwise one.
            out["w"] = array(weight.permute(2, 3, 0, 1) if layer["depthwise"] else weight.permute(2, 3, 1, 0))
            out["b"] = array(bias)
        elif layer["op"] == "dense":
            out["w"], out["b"] = array(layer["linear"].weight.double().T), array(layer["linear"].bias.double())
        elif layer["op"] == "block":
            out["layers"] = [record(inner) for inner in layer["layers"]]
        elif layer["op"] == "normalize":
            mean, std = model.mean.double().reshape(-1), model.std.double().reshape(-1)
            out["scale"], out["offset"] = array(1.0 / std), array(-mean / std)
        return out

    return {"layers": [record(layer) for layer in walk(model)]}, arrays


def save_graph(model: Any, image_size: int, path: Path) -> None:
    spec, arrays = graph_spec(model)
    spec["image_size"] = int(image_size)
    np.savez(path, spec=np.array(json.dumps(spec)), **arrays)


def _padding(size: int, kernel: int, stride: int, pad: int) -> str | None:
    """'SAME' or 'VALID' where TF's rule gives PyTorch's symmetric padding, else None (explicit pad)."""
    if pad == 0:
        return "VALID"
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    same_matches = (total // 2, total - total // 2) == (pad, pad) and out == (size + 2 * pad - kernel) // stride + 1
    return "SAME" if same_matches else None


def build(path: Path) -> Any:
    """The concrete TF function of a saved graph: ``pixels`` [1, H, W, 3] float32 -> ``logits``."""
    import tensorflow as tf

    data = np.load(path)
    spec = json.loads(str(data["spec"]))
    const = {name: tf.constant(data[name]) for name in data.files if name != "spec"}

    def conv(x: Any, layer: dict[str, Any]) -> Any:
        weight = const[layer["w"]]
        kernel, stride, pad = int(weight.shape[0]), layer["stride"], layer["pad"]
        padding = _padding(int(x.shape[1]), kernel, stride, pad)
        if padding is None or _padding(int(x.shape[2]), kernel, stride, pad) != padding:
            x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
            padding = "VALID"
        if layer["depthwise"]:
            x = tf.nn.depthwise_conv2d(x, weight, [1, stride, stride, 1], padding)
        else:
            x = tf.nn.conv2d(x, weight, stride, padding)
        x = tf.nn.bias_add(x, const[layer["b"]])
        if layer["act"] == "relu6":
            x = tf.nn.relu6(x)
        elif layer["act"] == "relu":
            x = tf.nn.relu(x)
        return x

    def run(x: Any, layers: list[dict[str, Any]]) -> Any:
        for layer in layers:
            with tf.name_scope(layer["name"]):
                x = apply(x, layer)
        return x

    def apply(x: Any, layer: dict[str, Any]) -> Any:
        op = layer["op"]
        if op == "normalize":  # a 1x1 depthwise convolution: see the module docstring
            scale = tf.reshape(const[layer["scale"]], [1, 1, -1, 1])
            return tf.nn.bias_add(tf.nn.depthwise_conv2d(x, scale, [1, 1, 1, 1], "VALID"), const[layer["offset"]])
        if op == "conv":
            return conv(x, layer)
        if op == "block":
            y = run(x, layer["layers"])
            return tf.add(x, y, name="add") if layer["residual"] else y
        if op == "mean":
            return tf.reduce_mean(x, axis=[1, 2])
        if op == "dense":
            return tf.matmul(x, const[layer["w"]]) + const[layer["b"]]
        raise ValueError(f"unknown layer op {op!r} in {path}")

    size = spec["image_size"]

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="pixels")])
    def model(pixels: Any) -> Any:
        return {"logits": run(pixels, spec["layers"])}

    return model.get_concrete_function()
