"""Float-model transforms before int8 conversion (MobileNetV2): give every channel the int8 grid.

An int8 activation tensor has one scale and zero point for all its channels, so a channel whose values
span 0.1 while another spans 7 is rounded as coarsely as the widest one, and a later layer that
amplifies the narrow channel amplifies its rounding noise too. Both transforms here move per-channel
factors into the weights around such tensors (Nagel et al. 2019, "Data-Free Quantization", cross-layer
equalisation, applied to *activation* ranges measured on the calibration images):

**Linear streams** (:func:`equalize`, exact in float). Each stage of MobileNetV2 is a stream of linear
tensors: block ``i``'s projection (conv + BatchNorm, no activation) starts it, the stage's residual
blocks add their projections to it, and 1x1 convolutions read it (the residual blocks' expansions, then
the next stage's first block or the final 1x1 conv). Channel ``c`` of the whole stream can be shifted by
``t_c`` and scaled by ``s_c`` without changing the function: the first projection's BatchNorm shifts and
scales, every later projection scales, every reader divides its input column ``c`` by ``s_c`` and
absorbs the shift in its BatchNorm's running mean. The shift centres channel ``c``'s range (over the
stream's start and its sums) on zero, and ``s_c = R / r_c`` (``r_c`` the channel's half-width, or
the residual projections' largest magnitude if wider; ``R`` the largest ``r_c``) makes every channel
span the stream's widest range.

**ReLU6 outputs that feed a depthwise convolution** (:func:`equalize_relu`). The stem and every
expansion end in ReLU6 and feed a depthwise convolution, whose weights are quantised per channel:
dividing its channel ``c`` by ``s_c`` costs no weight precision. Scaling the ReLU6 input by
``s_c = R / r_c`` (``r_c`` the channel's calibration maximum, ``R`` the tensor's; at most
:data:`MAX_RELU_SCALE`) is exact while the scaled value stays under 6, i.e. up to ``6 r_c / R >= r_c``;
above that the transformed model clips channel ``c`` earlier. The int8 model clips at the calibrated
range anyway (``R``; in the channel's own units ``r_c`` after), so this is per-channel instead of
per-tensor clipping at the calibration maximum -- but not exactly the float function.

The export therefore builds the int8 model from a transformed copy (:func:`equalize_for_int8`, its own
graph, see :mod:`edgetl.export.tflite_process`) and the float exports from the trained model itself; the int8
model is checked against the trained model like any other. Measured on the sign-language run (411
validation images): see ``benchmarks/results/export_bench_sign_language_cpu.md``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# At most this factor per ReLU6 channel: the depthwise weights shrink by it and their int32 bias grows by it
# (bias scale = input scale x weight scale), and a near-dead channel gains little from more.
MAX_RELU_SCALE = 256.0


def _channel_ranges(model: Any, modules: list[Any], images: np.ndarray) -> list[tuple[Any, Any]]:
    """Per-channel (min, max) of each module's output over ``images``, float64, in one pass (of the fast
    inference copy of ``model``, whose modules have the same names and outputs)."""
    import torch

    from edgetl.train.loop import inference_copy, predict_logits

    names = {id(module): name for name, module in model.named_modules()}
    fast = inference_copy(model)
    fast_modules = dict(fast.named_modules())
    seen: list[list[tuple[Any, Any]]] = [[] for _ in modules]

    def hook_for(i: int) -> Any:
        def record(module: Any, inputs: Any, output: Any) -> None:
            seen[i].append((output.detach().amin((0, 2, 3)), output.detach().amax((0, 2, 3))))
        return record

    hooks = [fast_modules[names[id(module)]].register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        predict_logits(fast, images, torch.device("cpu"))
    finally:
        for hook in hooks:
            hook.remove()
    return [(torch.stack([lo for lo, _ in batches]).amin(0).double(),
             torch.stack([hi for _, hi in batches]).amax(0).double()) for batches in seen]  # fmt: skip


def streams(features: Any) -> list[dict[str, Any]]:
    """MobileNetV2's stages as linear streams: ``{"first": i, "residual": [j, ...], "readers": [...]}``.

    Block ``i`` (no residual) starts the stream, blocks ``j`` add their projections to it, and every
    reader is a conv + BatchNorm sequence whose 1x1 convolution reads the stream (the residual blocks'
    expansions and the next block's, or the final 1x1 conv). A stage read by anything else is left out.
    """
    from torch import nn
    from torchvision.models.mobilenetv2 import InvertedResidual

    def reader(module: Any) -> Any:
        first = module.conv[0] if isinstance(module, InvertedResidual) else module
        ok = (isinstance(first, nn.Sequential) and len(first) >= 2 and isinstance(first[0], nn.Conv2d)
              and first[0].kernel_size == (1, 1) and first[0].groups == 1 and isinstance(first[1], nn.BatchNorm2d))
        return first if ok else None  # fmt: skip

    found = []
    i = 0
    while i < len(features):
        block = features[i]
        if not isinstance(block, InvertedResidual) or block.use_res_connect:
            i += 1
            continue
        j = i + 1
        while j < len(features) and isinstance(features[j], InvertedResidual) and features[j].use_res_connect:
            j += 1
        readers = [reader(features[k]) for k in range(i + 1, min(j + 1, len(features)))]
        if j < len(features) and all(r is not None for r in readers):  # readers holds block j's at least
            found.append({"first": i, "residual": list(range(i + 1, j)), "readers": readers})
        i = j
    return found


def _stream_tensors(features: Any, stream: dict[str, Any]) -> list[Any]:
    """Modules whose outputs are the stream's int8 tensors: the first block, then each residual block's
    projection and the block (its sum)."""
    modules = [features[stream["first"]]]
    for j in stream["residual"]:
        modules += [features[j].conv, features[j]]
    return modules


def equalize(model: Any, images: np.ndarray, max_images: int | None = None) -> list[dict[str, Any]]:
    """Centre and equalise, in place, the channel ranges of every linear stream (exact in float).

    Args:
        model: an :class:`edgetl.train.model.EdgeClassifier` (MobileNetV2) in eval mode.
        images: calibration images, uint8 ``[N, H, W, 3]`` (never validation images).
        max_images: how many of them to measure ranges on (default: all, the images TFLite calibrates on, so
            that each channel's range is the one the int8 model is calibrated to).

    Returns one record per stream: its blocks, channels, largest scale and shift.
    """
    found = streams(model.net.features)
    modules = [m for stream in found for m in _stream_tensors(model.net.features, stream)]
    return _equalize_streams(model.net.features, found, _channel_ranges(model, modules, images[:max_images]))


def _equalize_streams(features: Any, found: list[dict[str, Any]], measured: list[tuple[Any, Any]]) -> list[dict]:
    import torch

    records = []
    for stream in found:
        count = 1 + 2 * len(stream["residual"])
        tensors, measured = measured[:count], measured[count:]
        starts_and_sums, projections = tensors[0::2], tensors[1::2]
        low = torch.stack([lo for lo, _ in starts_and_sums]).amin(0)
        high = torch.stack([hi for _, hi in starts_and_sums]).amax(0)
        shift = -(low + high) / 2  # the residual projections are not shifted: only the stream is
        half = (high - low) / 2
        for lo, hi in projections:
            half = torch.maximum(half, torch.maximum(lo.abs(), hi.abs()))
        name = "features." + "+".join(str(b) for b in [stream["first"], *stream["residual"]])
        if bool((half <= 0).any()):
            log.info("equalisation: %s has a constant channel; left unchanged", name)
            continue
        scale = half.max() / half
        projection_bns = [features[b].conv[-1] for b in [stream["first"], *stream["residual"]]]
        with torch.no_grad():
            for reader in stream["readers"]:  # W (s (x + t)) / s = W x + W t: the BatchNorm's mean absorbs W t
                weight = reader[0].weight.double()[:, :, 0, 0]
                reader[1].running_mean.add_((weight @ shift).to(reader[1].running_mean.dtype))
                reader[0].weight.div_(scale.to(reader[0].weight.dtype)[None, :, None, None])
            projection_bns[0].bias.add_(shift.to(projection_bns[0].bias.dtype))
            for bn in projection_bns:
                bn.weight.mul_(scale.to(bn.weight.dtype))
                bn.bias.mul_(scale.to(bn.bias.dtype))
        records.append({"tensor": name, "channels": int(len(half)), "range_min": float(half.min()),
                        "range_max": float(half.max()), "scale_max": float(scale.max()),
                        "shift_max": float(shift.abs().max())})  # fmt: skip
    if records:
        log.info("equalised %d linear streams, scales up to %.3g", len(records), max(r["scale_max"] for r in records))
    return records


def relu_pairs(features: Any) -> list[tuple[str, Any, Any]]:
    """``(name, producer, depthwise)``: every conv + BatchNorm + ReLU6 whose output feeds a depthwise
    convolution alone (the stem into block 1, each expansion into its block's depthwise)."""
    from torch import nn
    from torchvision.models.mobilenetv2 import InvertedResidual

    pairs = []
    for i, block in enumerate(features):
        if not isinstance(block, InvertedResidual):
            continue
        convs = list(block.conv)
        if len(convs) == 4:  # expansion 1x1 (+BN+ReLU6), depthwise, projection, BN
            pairs.append((f"features.{i}.conv.0", convs[0], convs[1]))
        elif i > 0 and not isinstance(features[i - 1], InvertedResidual):  # block 1: the stem feeds it
            pairs.append((f"features.{i - 1}", features[i - 1], convs[0]))
    return [(name, a, b) for name, a, b in pairs
            if len(a) == 3 and isinstance(a[1], nn.BatchNorm2d) and isinstance(a[2], nn.ReLU6)
            and b[0].groups == b[0].in_channels == b[0].out_channels > 1]  # fmt: skip


def equalize_relu(model: Any, images: np.ndarray, max_images: int | None = None) -> list[dict[str, Any]]:
    """Scale, in place, each ReLU6 output that feeds a depthwise convolution to equal channel maxima.

    For the int8 model only: see the module docstring for what changes above the calibration maximum.
    Returns one record per tensor: name, channels, largest scale, channels left alone (never positive).
    """
    pairs = relu_pairs(model.net.features)
    return _equalize_relu(pairs, _channel_ranges(model, [a for _, a, _ in pairs], images[:max_images]))


def _equalize_relu(pairs: list[tuple[str, Any, Any]], measured: list[tuple[Any, Any]]) -> list[dict[str, Any]]:
    import torch

    records = []
    for (name, producer, depthwise), (_, high) in zip(pairs, measured, strict=True):
        dead = high <= 0  # never positive here: scaling it would only scale zero
        scale = torch.where(dead, torch.ones_like(high), high.max() / high.clamp_min(1e-30)).clamp(max=MAX_RELU_SCALE)
        bn, conv = producer[1], depthwise[0]
        with torch.no_grad():  # ReLU6(s z) = s ReLU6(z) while s z <= 6, i.e. up to the channel's own maximum
            bn.weight.mul_(scale.to(bn.weight.dtype))
            bn.bias.mul_(scale.to(bn.bias.dtype))
            conv.weight.div_(scale.to(conv.weight.dtype)[:, None, None, None])  # per-channel weights: free
        records.append({"tensor": name, "channels": int(len(high)), "scale_max": float(scale.max()),
                        "dead_channels": int(dead.sum())})  # fmt: skip
    if records:
        log.info("equalised %d ReLU6 outputs before depthwise convolutions (int8 model), scales up to %.3g",
                 len(records), max(r["scale_max"] for r in records))  # fmt: skip
    return records


def equalize_for_int8(model: Any, images: np.ndarray, max_images: int | None = None) -> tuple[Any, list, list]:
    """A copy of ``model`` for the int8 graph with both transforms applied, from one pass over the images:
    ``(copy, equalize's records, equalize_relu's records)``. ``model`` itself is not changed (the exact
    stream transform leaves the ReLU6 outputs as they were, so one measurement serves both)."""
    import copy

    int8_model = copy.deepcopy(model)
    features = int8_model.net.features
    found, relus = streams(features), relu_pairs(features)
    modules = [m for stream in found for m in _stream_tensors(features, stream)]
    measured = _channel_ranges(int8_model, modules + [a for _, a, _ in relus], images[:max_images])
    records = _equalize_streams(features, found, measured[: len(modules)])
    return int8_model, records, _equalize_relu(relus, measured[len(modules):])
