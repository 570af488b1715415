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


class UnsupportedModel(Exception):
    """The model has a module the direct converter does not translate."""


def walk(model: Any) -> list[dict[str, Any]]:
    """The layers of an :class:`~edgetl.model.EdgeClassifier`, in order, as records holding its modules.

    ``{"op": "normalize"}``, ``{"op": "conv", "conv": Conv2d, "bn": BatchNorm2d | None, "act": ...}``,
    ``{"op": "block", "residual": bool, "layers": [...]}``, ``{"op": "mean"}``, ``{"op": "dense",
    "linear": Linear}``, each with a "name" (the module path). Shared by :func:`graph_spec` and the
    quantisation simulation of :mod:`edgetl.qat`, so both see the same graph.
    """
    import torch
    from torchvision.models import MobileNetV2
    from torchvision.models.mobilenetv2 import InvertedResidual

    if type(model.net) is not MobileNetV2:
        raise UnsupportedModel(f"expected torchvision's MobileNetV2, got {type(model.net).__name__}")
    # PyTorch's module paths name the TF ops, hence the TFLite tensors in diagnoses and compiler logs.
    names = {module: name.removeprefix("net.") for name, module in model.named_modules()}

    def conv(module: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d | None) -> dict[str, Any]:
        stride, pad = module.stride, module.padding
        if (
            stride[0] != stride[1] or not isinstance(pad, tuple) or pad[0] != pad[1]
            or module.dilation != (1, 1) or module.padding_mode != "zeros"
        ):  # fmt: skip
            raise UnsupportedModel(f"a Conv2d with stride {stride}, padding {pad}, dilation {module.dilation}")
        depthwise = module.groups > 1
        if depthwise and not (module.groups == module.in_channels == module.out_channels):
            raise UnsupportedModel(f"a grouped Conv2d with {module.groups} groups")
        return {"op": "conv", "name": names[module], "conv": module, "bn": bn, "stride": stride[0], "pad": pad[0],
                "depthwise": depthwise, "act": None}  # fmt: skip

    def sequence(modules: Any) -> list[dict[str, Any]]:
        layers: list[dict[str, Any]] = []
        items = list(modules)
        i = 0
        while i < len(items):
            module = items[i]
            if isinstance(module, torch.nn.Conv2d):
                bn = items[i + 1] if i + 1 < len(items) and isinstance(items[i + 1], torch.nn.BatchNorm2d) else None
                layers.append(conv(module, bn))
                i += 2 if bn is not None else 1
                continue
            if isinstance(module, (torch.nn.ReLU6, torch.nn.ReLU)):
                if not layers or layers[-1]["op"] != "conv" or layers[-1]["act"] is not None:
                    raise UnsupportedModel(f"a {type(module).__name__} that does not follow a convolution")
                layers[-1]["act"] = "relu6" if isinstance(module, torch.nn.ReLU6) else "relu"
            elif isinstance(module, InvertedResidual):
                layers.append({"op": "block", "name": names[module], "residual": bool(module.use_res_connect),
                               "layers": sequence(module.conv)})  # fmt: skip
            elif isinstance(module, torch.nn.Sequential):  # Conv2dNormActivation
                layers.extend(sequence(module))
            elif isinstance(module, torch.nn.Linear):
                layers.append({"op": "dense", "name": names[module], "linear": module})
            elif not isinstance(module, (torch.nn.Dropout, torch.nn.Identity)):  # identities in eval mode
                raise UnsupportedModel(f"a {type(module).__name__} module")
            i += 1
        return layers

    layers = [{"op": "normalize", "name": "normalize"}, *sequence(model.net.features)]
    layers.append({"op": "mean", "name": "pool"})  # MobileNetV2.forward: adaptive_avg_pool2d to 1x1, flatten
    return layers + sequence(model.net.classifier)


def fold(conv: Any, bn: Any, dtype: Any = None) -> tuple[Any, Any]:
    """Weight and bias of ``conv`` followed by ``bn`` in eval mode (torch tensors, differentiable)."""
    import torch

    weight = conv.weight if dtype is None else conv.weight.to(dtype)
    bias = torch.zeros_like(weight[:, 0, 0, 0]) if conv.bias is None else conv.bias.to(weight.dtype)
    if bn is None:
        return weight, bias
    gamma, beta, mean, var = (t.to(weight.dtype) for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    scale = gamma / torch.sqrt(var + bn.eps)
    return weight * scale[:, None, None, None], (bias - mean) * scale + beta


def graph_spec(model: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Walk an :class:`~edgetl.model.EdgeClassifier` (eval mode) into layer records and arrays."""
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
