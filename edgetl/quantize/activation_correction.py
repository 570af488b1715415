"""Bias correction of what rounding the *activations* leaves: the mean error at the output layer, or
every layer's in execution order, measured on calibration images with XNNPACK running the int8 model
(every layer's output exposed as a graph output, biases patched in place). The weight-rounding part
is :mod:`edgetl.quantize.bias_correction`; :func:`correct_activations` keeps whichever candidate gives
the higher logit SQNR on calibration images the corrections were not fitted on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgetl.quantize.bias_correction import (
    NotCorrectable,
    has_bias,
    model_means,
    paired,
    probe_model,
    shift_bias,
    subtract_from_bias,
    tensor_means,
    unshare_bias_buffers,
    weighted_ops,
)
from edgetl.quantize.tflite_facts import op_names


def outputs(model: bytes | str, images: np.ndarray, threads: int = 1) -> np.ndarray:
    """A model's dequantised output for each image, fed as parity and the device feed it
    (:class:`edgetl.runtime.model.TFLiteClassifier`: e.g. an int16x8 model's input quantised)."""
    import tempfile
    from pathlib import Path

    from edgetl.runtime.model import TFLiteClassifier, predict_all

    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, bytes):
            Path(tmp, "model.tflite").write_bytes(model)
            model = str(Path(tmp, "model.tflite"))
        classifier = TFLiteClassifier(model, num_threads=threads)
        return predict_all(classifier, images).astype(np.float64)


def correct_output(quantized: bytes, float_model_path: str, images: np.ndarray, count: int = 128,
                   threads: int = 1) -> tuple[bytes, dict]:  # fmt: skip
    """Empirical bias correction of the output layer: subtract, from the bias of the weighted op that
    produces the model's output, the mean difference between the quantised and the float model's
    outputs over up to ``count`` calibration images.

    :func:`correct` removes each layer's *own* expected weight-rounding error. What reaches the logits
    also carries the mean of everything rounded upstream (activations included), passed through the
    ReLU6s; on the sign-language run a per-class logit shift comparable to the error's spread was left.
    The output layer is linear, so the correction is exact for the mean. Measured there
    (benchmarks/export_bench.py, an earlier graph): int8 agreement with float 96.84 % -> 98.05 %,
    int16x8 99.51 % -> 99.76 %. int8 models get :func:`correct_sequential` instead, which does this for
    every layer. Raises NotCorrectable when the output is not a weighted op's linear output.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    qmodel = flatbuffer_utils.convert_bytearray_to_object(bytearray(quantized))
    graph = qmodel.subgraphs[0]
    names = op_names()
    output = graph.outputs[0]
    while True:  # (de)quantising the output is affine: the mean error passes through unchanged
        before = [op for op in graph.operators if output in op.outputs]
        kind = names[qmodel.operatorCodes[before[0].opcodeIndex].builtinCode] if before else None
        if kind not in ("QUANTIZE", "DEQUANTIZE"):
            break
        output = before[0].inputs[0]
    producers = [(kind, op) for kind, op in weighted_ops(qmodel) if output in op.outputs]
    if not producers:
        raise NotCorrectable("the model's output is not produced by a convolution or fully connected layer")
    kind, op = producers[0]
    unshare_bias_buffers(qmodel)
    if getattr(op.builtinOptions, "fusedActivationFunction", 0) != 0:
        raise NotCorrectable(f"the output {kind} has a fused activation")
    if not has_bias(op):
        raise NotCorrectable(f"the output {kind} has no bias")
    images = images[:count]
    error = outputs(quantized, images, threads) - outputs(float_model_path, images, threads)
    error = error.reshape(-1, error.shape[-1]).mean(axis=0)
    subtract_from_bias(qmodel, op, f"the output {kind}", error)
    out_scale = graph.tensors[op.outputs[0]].quantization.scale[0]
    shift = float(np.abs(error).max() / out_scale)
    summary = {"op": kind, "images": int(len(images)), "largest_shift_steps": round(shift, 2)}
    return bytes(flatbuffer_utils.convert_object_to_bytearray(qmodel)), summary


def spread(images: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` of ``images``, evenly spaced (a user's folder may be sorted by class or time)."""
    return images if len(images) <= count else images[_spread_index(len(images), count)]


def _spread_index(total: int, count: int) -> np.ndarray:
    return np.linspace(0, total - 1, count).round().astype(int)


def layer_shifts(quantized: bytes, float_model_path: str, images: np.ndarray, threads: int = 1) -> list[float]:
    """Per weighted layer, in execution order: the largest per-channel mean difference between the
    quantised and the float model's output over ``images``, in units of the layer's output step."""
    qmodel, fmodel, qops, fops = paired(quantized, float_model_path)
    qouts = [op.outputs[0] for _, op in qops]
    qmeans = model_means(qmodel, qouts, images, threads)
    fmeans = model_means(fmodel, [op.outputs[0] for _, op in fops], images, threads)
    steps = [qmodel.subgraphs[0].tensors[t].quantization.scale[0] for t in qouts]
    return [float(np.abs(q - f).max() / step) for q, f, step in zip(qmeans, fmeans, steps, strict=True)]


def correct_sequential(quantized: bytes, float_model_path: str, images: np.ndarray, count: int = 64,
                       threads: int = 1) -> tuple[bytes, dict]:  # fmt: skip
    """Empirical bias correction of every weighted layer, in execution order (Nagel et al. 2019, §4.2,
    the empirical variant): each layer's bias loses the mean difference, per output channel, between
    its quantised output and the float model's over up to ``count`` calibration images, measured with
    every earlier layer already corrected.

    :func:`correct` removes each layer's expected *weight*-rounding error analytically. Rounding the
    activations adds noise that is zero-mean where it is made, but every ReLU6 it passes through turns
    part of it into a shift (a clipped noisy value is biased), and the shifts add up layer after layer.
    Measuring each layer with the layers before it already corrected removes what it receives as well
    as what it makes; a layer with a fused ReLU6 is corrected on its clipped output, an approximation
    that measured better than leaving it (sign-language run: int8 logit SQNR +0.4 to +1.4 dB over 5
    calibration seeds, benchmarks/calib_seed_bench.py). The last layer is linear, so there the
    correction is exact for the mean (the work :func:`correct_output` does for models this cannot run).

    Runs the model once per layer on ``count`` images through LiteRT's XNNPACK delegate, with every
    layer's output exposed as a graph output and the biases patched in place between runs. int8
    models only (XNNPACK does not run int16x8). Raises NotCorrectable when the models do not pair.
    """
    from ai_edge_litert import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    qmodel, fmodel, layers, fops = paired(quantized, float_model_path)
    qgraph = qmodel.subgraphs[0]
    if not all(has_bias(op) for _, op in layers):
        raise NotCorrectable("a weighted layer has no bias")
    if len({op.inputs[2] for _, op in layers}) != len(layers):
        raise NotCorrectable("weighted layers share a bias tensor")
    unshare_bias_buffers(qmodel)
    images = spread(images, count)
    reference = model_means(fmodel, [op.outputs[0] for _, op in fops], images, threads)

    outputs_ = [op.outputs[0] for _, op in layers]
    blob = probe_model(qmodel, outputs_)
    flat = schema.Model.GetRootAs(blob, 0)
    raw = np.frombuffer(blob, np.uint8)  # writable: ``blob`` is a bytearray
    biases = []  # int32 views into ``blob``, one per layer
    for _, op in layers:
        bias = qgraph.tensors[op.inputs[2]]
        if bias.type != 2:  # TensorType INT32
            raise NotCorrectable(f"bias {bias.name!r} is not int32 (an int8 model's)")
        stored = flat.Buffers(bias.buffer).DataAsNumpy()
        if not isinstance(stored, np.ndarray) or not np.shares_memory(stored, raw):
            raise NotCorrectable(f"bias {bias.name!r} is not stored inside the model")
        start = stored.__array_interface__["data"][0] - raw.__array_interface__["data"][0]
        view = raw[start : start + stored.size].view(np.int32)
        biases.append((view, bias.quantization.scale))
    largest = 0.0
    for output, (values, step), target in zip(outputs_, biases, reference, strict=True):
        (mean,) = tensor_means(bytes(blob), [output], images, threads)  # earlier layers corrected
        error = mean - target
        values[:] = shift_bias(values, error, step)
        largest = max(largest, float(np.abs(error).max() / qgraph.tensors[output].quantization.scale[0]))
    for (_, op), (values, _) in zip(layers, biases, strict=True):
        qmodel.buffers[qgraph.tensors[op.inputs[2]].buffer].data = np.frombuffer(values.tobytes(), np.uint8)
    summary = {"layers": len(layers), "images": int(len(images)), "largest_shift_steps": round(largest, 2)}
    return bytes(flatbuffer_utils.convert_object_to_bytearray(qmodel)), summary


def _sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    noise = float(np.sum((reference - actual) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(reference**2)) / noise)


def correct_activations(quantized: bytes, float_model_path: str, images: np.ndarray, count: int = 64,
                        held_out_count: int = 128, threads: int = 1) -> tuple[bytes, dict]:  # fmt: skip
    """After :func:`correct`: remove the mean error that rounding the activations leaves, and keep it
    only where it helps.

    Two corrections are fitted on up to ``count`` of the calibration images (at most half of them):
    :func:`correct_sequential` (every layer) and :func:`correct_output` (the output layer only). The
    model kept is whichever of those two and the uncorrected one has the highest logit SQNR against
    the float model on up to ``held_out_count`` calibration images not used to fit them. The
    sequential correction corrects layers with fused ReLU6s on their clipped outputs, an approximation
    that usually helps and sometimes does not: over five calibration seeds of a whole-backbone
    sign-language fine-tune it cost one export 2.2 dB of logit SQNR and moved the others by -0.2 to
    +0.6 dB (benchmarks/calib_seed_bench.py at commit 558c543, before this choice existed).
    """
    names = ("uncorrected", "output_layer", "sequential")
    if len(images) < 2:
        raise NotCorrectable("fewer than two calibration images")
    fit_count = min(count, len(images) // 2)
    fit_index = _spread_index(len(images), fit_count)
    fit, held_out = images[fit_index], spread(np.delete(images, fit_index, axis=0), held_out_count)
    candidates = {"uncorrected": quantized}
    summary: dict[str, Any] = {"fit_images": int(fit_count), "held_out_images": int(len(held_out))}
    for name, method in (("output_layer", correct_output), ("sequential", correct_sequential)):
        try:
            candidates[name], summary[name] = method(quantized, float_model_path, fit, fit_count, threads)
        except NotCorrectable as exc:
            summary[name] = {"skipped": str(exc)}
    reference = outputs(float_model_path, held_out, threads)
    scores = {name: _sqnr_db(reference, outputs(candidates[name], held_out, threads))
              for name in names if name in candidates}  # fmt: skip
    kept = max(scores, key=lambda name: (scores[name], names.index(name)))  # a tie goes to the more thorough
    summary["held_out_sqnr_db"] = {name: round(score, 2) for name, score in scores.items()}
    summary["kept"] = kept
    return candidates[kept], summary
