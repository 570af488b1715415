"""Bias correction of a quantised TFLite model (Nagel et al. 2019, "Data-Free Quantization", §4.2).

Rounding a layer's weights to int8 changes its output by ``conv(x, Wq - W)``. That error is mostly a
*shift*: its mean over real inputs is far from zero whenever the inputs themselves have a large mean.
Fine-tuned MobileNetV2s make it large: a frozen ImageNet BatchNorm with a tiny running variance folds
into weights hundreds of times larger than its neighbours', whose products with the (non-zero-mean)
input nearly cancel against an equally large bias. Measured on the sign-language run: int8 weights
alone (float activations) flip 4 % of the float model's predictions; with this correction 0.2 %.

The correction subtracts the expected error from each layer's int32 bias:

    E[conv(x, Wq - W)] = conv(E[x], Wq - W)      (convolution is linear)

so only the per-pixel mean of every layer's float input over the calibration images is needed, taken
from the float TFLite model converted from the same SavedModel. Weighted ops are paired by order and
checked by type and weight shape; anything unexpected leaves the model unchanged and says why.

What is left after that comes from the activations: :func:`correct_sequential` (int8 models) then
measures every layer's remaining mean error, in execution order, and removes it;
:func:`correct_output` does it for the output layer only (int16x8 models, which XNNPACK cannot run).
Runs in the converter process (it needs TensorFlow's flatbuffer schema to rewrite the model).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgetl.quantize.tflite_facts import op_names

WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


class NotCorrectable(Exception):
    """The float and quantised models cannot be paired op by op."""


def weighted_ops(model: Any) -> list[tuple[str, Any]]:
    names = op_names()
    graph = model.subgraphs[0]
    ops = []
    for op in graph.operators:
        name = names[model.operatorCodes[op.opcodeIndex].builtinCode]
        if name in WEIGHTED_OPS:
            ops.append((name, op))
    return ops


def has_bias(op: Any) -> bool:
    return len(op.inputs) > 2 and op.inputs[2] >= 0


def paired(quantized: bytes, float_model_path: str) -> tuple[Any, Any, list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The quantised and the float model as objects, and their weighted ops, which must pair by order."""
    from tensorflow.lite.tools import flatbuffer_utils

    qmodel = flatbuffer_utils.convert_bytearray_to_object(bytearray(quantized))
    fmodel = flatbuffer_utils.read_model(float_model_path)
    qops, fops = weighted_ops(qmodel), weighted_ops(fmodel)
    if [k for k, _ in qops] != [k for k, _ in fops]:
        raise NotCorrectable("the float and quantised models have different weighted ops")
    return qmodel, fmodel, qops, fops


def buffer(model: Any, tensor: Any, dtype: np.dtype) -> np.ndarray:
    data = model.buffers[tensor.buffer].data
    if data is None:
        raise NotCorrectable(f"tensor {tensor.name!r} has no constant data")
    return np.frombuffer(bytes(data), dtype=dtype).reshape(tensor.shape)


def subtract_from_bias(model: Any, op: Any, kind: str, error: np.ndarray) -> None:
    """Subtract ``error`` (real units, per output channel) from ``op``'s quantised bias, in place."""
    bias = model.subgraphs[0].tensors[op.inputs[2]]
    dtype = {2: np.int32, 4: np.int64}.get(bias.type)  # TensorType INT32 = 2, INT64 = 4
    if dtype is None:
        raise NotCorrectable(f"unexpected bias type {bias.type} in {kind}")
    shifted = shift_bias(buffer(model, bias, dtype), error, bias.quantization.scale)
    model.buffers[bias.buffer].data = np.frombuffer(shifted.tobytes(), np.uint8)


def shift_bias(values: np.ndarray, error: np.ndarray, step: Any) -> np.ndarray:
    """Quantised bias ``values`` (step ``step`` per channel) minus ``error`` in real units, rounded to
    the step and clipped to the values' integer type."""
    info = np.iinfo(values.dtype)
    shifted = values.astype(np.int64) - np.round(error / np.asarray(step, np.float64)).astype(np.int64)
    return np.clip(shifted, info.min, info.max).astype(values.dtype)


def _padding(size: int, kernel: int, stride: int, dilation: int, same: bool) -> tuple[int, int]:
    if not same:
        return 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def tap_means(mean_input: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
              dilation: tuple[int, int], same: bool) -> np.ndarray:  # fmt: skip
    """For a mean input map [H, W, C]: the mean over output positions of the input under each tap.

    Returns [KH, KW, C] such that, for any filter ``w`` [KH, KW, C], the spatial mean of
    ``conv(mean_input, w)`` is ``sum(w * result)`` — zero padding included.
    """
    (h, w, c), (kh, kw), (sh, sw), (dh, dw) = mean_input.shape, kernel, stride, dilation
    top, bottom = _padding(h, kh, sh, dh, same)
    left, right = _padding(w, kw, sw, dw, same)
    padded = np.pad(mean_input, ((top, bottom), (left, right), (0, 0)))
    out_h = (padded.shape[0] - (kh - 1) * dh - 1) // sh + 1
    out_w = (padded.shape[1] - (kw - 1) * dw - 1) // sw + 1
    taps = np.empty((kh, kw, c), np.float64)
    for i in range(kh):
        for j in range(kw):
            window = padded[i * dh : i * dh + (out_h - 1) * sh + 1 : sh, j * dw : j * dw + (out_w - 1) * sw + 1 : sw]
            taps[i, j] = window.mean(axis=(0, 1))
    return taps


def _options(op: Any) -> tuple[tuple[int, int], tuple[int, int], bool]:
    opts = op.builtinOptions
    stride = (opts.strideH, opts.strideW)
    dilation = (getattr(opts, "dilationHFactor", 1) or 1, getattr(opts, "dilationWFactor", 1) or 1)
    return stride, dilation, opts.padding == 0  # Padding.SAME == 0


def expected_error(kind: str, op: Any, delta: np.ndarray, mean_input: np.ndarray) -> np.ndarray:
    """E[layer(x, delta)] per output channel, from the mean input map (batch dimension dropped)."""
    if kind == "FULLY_CONNECTED":
        return delta.astype(np.float64) @ mean_input.reshape(-1, delta.shape[1]).mean(axis=0)
    stride, dilation, same = _options(op)
    kernel = delta.shape[1:3]
    taps = tap_means(mean_input, kernel, stride, dilation, same)
    if kind == "CONV_2D":  # delta [O, KH, KW, I]
        return np.einsum("okhi,khi->o", delta.astype(np.float64), taps)
    multiplier = delta.shape[3] // mean_input.shape[2]  # DEPTHWISE_CONV_2D: delta [1, KH, KW, C*M]
    taps = np.repeat(taps, multiplier, axis=2)
    return np.einsum("khc,khc->c", delta[0].astype(np.float64), taps)


def mean_inputs(float_model_path: str, indices: list[int], images: np.ndarray, count: int) -> list[np.ndarray]:
    """Per-pixel mean over ``images`` of the float model's tensors ``indices`` (the weighted ops' inputs)."""
    from tensorflow.lite.tools import flatbuffer_utils

    return model_means(flatbuffer_utils.read_model(float_model_path), indices, images[:count], per_channel=False)


def correct(quantized: bytes, float_model_path: str, images: np.ndarray, count: int = 128) -> tuple[bytes, dict]:
    """Bias-correct ``quantized`` (the int8 or int16x8 model converted from the same SavedModel as
    ``float_model_path``) using up to ``count`` calibration ``images``.

    Returns the corrected model and a summary: layers corrected and the largest shift applied, in
    units of the layer's output quantisation step. Raises NotCorrectable when the models do not pair.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    qmodel, fmodel, qops, fops = paired(quantized, float_model_path)
    qgraph, fgraph = qmodel.subgraphs[0], fmodel.subgraphs[0]
    unshare_bias_buffers(qmodel)
    means = mean_inputs(float_model_path, [op.inputs[0] for _, op in fops], images, count)
    largest, corrected = 0.0, 0
    for (kind, qop), (_, fop), mean in zip(qops, fops, means, strict=True):
        qw, fw = qgraph.tensors[qop.inputs[1]], fgraph.tensors[fop.inputs[1]]
        if list(qw.shape) != list(fw.shape):
            raise NotCorrectable(f"weight shapes differ: {list(qw.shape)} vs {list(fw.shape)}")
        if not has_bias(qop):
            continue  # no bias tensor to correct (rare; the converter gives convolutions one)
        axis = qw.quantization.quantizedDimension
        shape = [1] * len(qw.shape)
        shape[axis] = -1
        wq = buffer(qmodel, qw, np.int8).astype(np.float64) * np.asarray(qw.quantization.scale).reshape(shape)
        error = expected_error(kind, qop, wq - buffer(fmodel, fw, np.float32), mean)
        subtract_from_bias(qmodel, qop, kind, error)
        out_scale = qgraph.tensors[qop.outputs[0]].quantization.scale[0]
        largest = max(largest, float(np.abs(error).max() / out_scale))
        corrected += 1
    summary = {"layers": corrected, "images": int(min(count, len(images))), "largest_shift_steps": round(largest, 2)}
    return bytes(flatbuffer_utils.convert_object_to_bytearray(qmodel)), summary


def unshare_bias_buffers(model: Any) -> None:
    """Give every weighted layer's bias a buffer of its own (the converter stores equal constants once,
    e.g. two all-zero biases), so that correcting one leaves the other alone."""
    import copy

    seen: set[int] = set()
    for _, op in weighted_ops(model):
        if not has_bias(op):
            continue
        bias = model.subgraphs[0].tensors[op.inputs[2]]
        if bias.buffer in seen:
            model.buffers.append(copy.deepcopy(model.buffers[bias.buffer]))
            bias.buffer = len(model.buffers) - 1
        seen.add(bias.buffer)


def probe_model(model: Any, tensors: list[int]) -> bytearray:
    """``model`` serialised with ``tensors`` added to its graph outputs, so that a delegated (XNNPACK)
    interpreter materialises them; the model object itself is left as it was."""
    from tensorflow.lite.tools import flatbuffer_utils

    graph = model.subgraphs[0]
    original = list(graph.outputs)
    graph.outputs = original + [t for t in dict.fromkeys(tensors) if t not in original and t not in graph.inputs]
    try:
        return bytearray(flatbuffer_utils.convert_object_to_bytearray(model))
    finally:
        graph.outputs = original


def model_means(model: Any, tensors: list[int], images: np.ndarray, threads: int = 1,
                 per_channel: bool = True) -> list[np.ndarray]:  # fmt: skip
    """:func:`tensor_means` of ``model`` (an object tree), with ``tensors`` exposed for it."""
    return tensor_means(bytes(probe_model(model, tensors)), tensors, images, threads, per_channel)


def tensor_means(content: bytes, tensors: list[int], images: np.ndarray, threads: int,
                  per_channel: bool = True) -> list[np.ndarray]:  # fmt: skip
    """The mean over ``images`` of each of ``tensors``, dequantised: per channel (last axis, over
    positions too), or per element with the batch axis dropped. ``content`` must list the tensors
    that are not its input as outputs (:func:`probe_model`), so that XNNPACK, which fuses the graph,
    writes them."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=threads)
    interpreter.allocate_tensors()
    feed = interpreter.get_input_details()[0]
    details = {d["index"]: d for d in [feed, *interpreter.get_output_details()]}
    sums = [0.0] * len(tensors)
    for image in images:
        interpreter.set_tensor(feed["index"], image[None].astype(feed["dtype"]))
        interpreter.invoke()
        for k, index in enumerate(tensors):
            value = interpreter.get_tensor(index)
            value = value.reshape(-1, value.shape[-1]) if per_channel else value[0]
            sums[k] = sums[k] + (value.sum(axis=0, dtype=np.float64) if per_channel else value.astype(np.float64))
    means = []
    for index, total in zip(tensors, sums, strict=True):
        scale, zero_point = details[index]["quantization"]
        positions = np.prod(interpreter.get_tensor(index).shape[:-1]) if per_channel else 1
        mean = total / (len(images) * positions)
        means.append((mean - zero_point) * scale if scale else mean)
    return means
