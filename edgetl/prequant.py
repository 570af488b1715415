"""Float-model transforms before int8 conversion (MobileNetV2): give every channel the int8 grid.

An int8 activation tensor has one scale and zero point for all its channels, so a channel whose values
span 0.1 while another spans 7 is rounded as coarsely as the widest one, and a later layer that
amplifies the narrow channel amplifies its rounding noise too. Two transforms move per-channel factors
into the weights around such a tensor (Nagel et al. 2019, "Data-Free Quantization", cross-layer
equalisation, applied here to *activation* ranges measured on the calibration images):

**Linear bottlenecks** (:func:`equalize`, exact in float). Block 1's projection is linear (conv +
BatchNorm, no activation) and feeds block 2 alone (no residual on either side), so channel ``c`` of
that tensor can be shifted by ``t_c`` and scaled by ``s_c`` — the projection's BatchNorm shifts and
scales its output, the next 1x1 convolution divides column ``c`` by ``s_c`` and absorbs the shift in
its BatchNorm's mean — without changing the function. The shift centres each channel's range
``[lo_c, hi_c]`` on zero and ``s_c = R / r_c`` (``r_c`` its half-width, ``R`` the largest) makes every
channel span the tensor's whole int8 range. The export applies it to the model it converts to float
too; the 1e-4 logit check against the trained model still applies.

**ReLU6 outputs that feed a depthwise convolution** (:func:`equalize_relu`, int8 model only). The
stem and every expansion convolution end in ReLU6 and feed a depthwise convolution, whose weights are
quantised per channel: dividing its channel ``c`` by ``s_c`` costs nothing in weight precision.
Scaling the ReLU6 input by ``s_c = R / r_c`` (``r_c`` the channel's calibration maximum, ``R`` the
tensor's) is exact while the scaled value stays under 6, i.e. for every value up to ``6 r_c / R >= r_c``;
above that the transformed model clips channel ``c`` earlier. The int8 model clips at the calibrated
range anyway (``R`` before, ``r_c`` in the channel's own units after), so the change is per-channel
instead of per-tensor clipping at the calibration maximum — but the float function is not exactly
the same, so the export applies it to the int8 model alone (a second graph, like a QAT run's weights)
and checks the result against the original model like any int8 model.

Measured on the sign-language run (411 validation images; ``benchmarks/export_bench.py``, results in
``benchmarks/results/export_bench_sign_language_cpu.md``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# At most this factor per ReLU6 channel: the depthwise weights shrink by it and their int32 bias grows by it
# (bias scale = input scale x weight scale), and a near-dead channel gains little from more.
MAX_RELU_SCALE = 256.0


def linear_pairs(features: Any) -> list[int]:
    """Indices ``i`` where block ``i``'s linear projection feeds block ``i + 1`` and nothing else."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    pairs = []
    for i in range(len(features) - 1):
        a, b = features[i], features[i + 1]
        if isinstance(a, InvertedResidual) and isinstance(b, InvertedResidual):
            # a residual on either side would add the unscaled tensor; block b must start with a 1x1 expansion
            if not a.use_res_connect and not b.use_res_connect and len(b.conv) == 4:
                pairs.append(i)
    return pairs


def _channel_ranges(model: Any, modules: list[Any], images: np.ndarray) -> list[tuple[Any, Any]]:
    """Per-channel (min, max) of each module's output over ``images``, float64, in one pass."""
    import torch

    from edgetl.train import predict_logits

    seen: list[list[tuple[Any, Any]]] = [[] for _ in modules]

    def hook_for(i: int) -> Any:
        def record(module: Any, inputs: Any, output: Any) -> None:
            seen[i].append((output.detach().amin((0, 2, 3)), output.detach().amax((0, 2, 3))))
        return record

    hooks = [module.register_forward_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        predict_logits(model, images, torch.device("cpu"))  # this model: the hooks are on it
    finally:
        for hook in hooks:
            hook.remove()
    return [(torch.stack([lo for lo, _ in batches]).amin(0).double(),
             torch.stack([hi for _, hi in batches]).amax(0).double()) for batches in seen]  # fmt: skip


def equalize(model: Any, images: np.ndarray, max_images: int = 128) -> list[dict[str, Any]]:
    """Centre and equalise, in place, the channel ranges of every linear bottleneck that feeds one block.

    Args:
        model: an :class:`edgetl.model.EdgeClassifier` (MobileNetV2) in eval mode.
        images: calibration images, uint8 ``[N, H, W, 3]`` (never validation images).
        max_images: how many of them to measure ranges on.

    Returns one record per equalised tensor: block, channels, smallest/largest half-range, largest
    scale and shift.
    """
    pairs = linear_pairs(model.net.features)
    if not pairs:
        return []
    return _equalize_linear(model.net.features, pairs, _channel_ranges(model, [model.net.features[i] for i in pairs],
                                                                       images[:max_images]))  # fmt: skip


def _equalize_linear(features: Any, pairs: list[int], measured: list[tuple[Any, Any]]) -> list[dict[str, Any]]:
    import torch

    records = []
    for i, (low, high) in zip(pairs, measured, strict=True):
        half = (high - low) / 2
        if bool((half <= 0).any()):
            log.info("equalisation: block %d has a constant channel; left unchanged", i)
            continue
        shift = -(low + high) / 2  # centre each channel's range on zero ...
        scale = half.max() / half  # ... then give every channel the widest one's
        bn = features[i].conv[-1]  # the projection's BatchNorm: its affine part shifts and scales the output
        expand, expand_bn = features[i + 1].conv[0][0], features[i + 1].conv[0][1]
        with torch.no_grad():
            weight = expand.weight.double()[:, :, 0, 0]
            expand_bn.running_mean.add_((weight @ shift).to(expand_bn.running_mean.dtype))  # W (y + t) - W t
            bn.bias.add_(shift.to(bn.bias.dtype))
            bn.weight.mul_(scale.to(bn.weight.dtype))
            bn.bias.mul_(scale.to(bn.bias.dtype))
            expand.weight.div_(scale.to(expand.weight.dtype)[None, :, None, None])
        records.append({
            "tensor": f"features.{i} -> features.{i + 1}",
            "channels": int(len(half)),
            "range_min": float(half.min()),
            "range_max": float(half.max()),
            "scale_max": float(scale.max()),
            "shift_max": float(shift.abs().max()),
        })  # fmt: skip
        log.info("equalised features.%d output: %d channels, half-ranges %.3g..%.3g, shifts up to %.3g", i,
                 len(half), float(half.min()), float(half.max()), float(shift.abs().max()))  # fmt: skip
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


def equalize_relu(model: Any, images: np.ndarray, max_images: int = 128) -> list[dict[str, Any]]:
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


def equalize_for_int8(model: Any, images: np.ndarray, max_images: int = 128) -> tuple[Any, list, list]:
    """:func:`equalize` ``model`` in place and return a copy with :func:`equalize_relu` applied too, for
    the int8 graph: ``(copy, equalize's records, equalize_relu's records)``. One pass over the images
    (the exact transform leaves the ReLU6 outputs as they were)."""
    import copy

    features = model.net.features
    linear, relus = linear_pairs(features), relu_pairs(features)
    measured = _channel_ranges(model, [features[i] for i in linear] + [a for _, a, _ in relus], images[:max_images])
    records = _equalize_linear(features, linear, measured[: len(linear)])
    int8_model = copy.deepcopy(model)
    return int8_model, records, _equalize_relu(relu_pairs(int8_model.net.features), measured[len(linear):])
