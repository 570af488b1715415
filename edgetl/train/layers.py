"""The model as an ordered list of layers, with its BatchNorms foldable into their convolutions.

The one walk of an :class:`~edgetl.train.model.EdgeClassifier` that both the TensorFlow graph builder
(:mod:`edgetl.export.tf_graph`) and the int8 simulation of quantisation-aware training
(:mod:`edgetl.quantize.qat`) follow, so both see the same graph.
"""

from __future__ import annotations

from typing import Any


class UnsupportedModel(Exception):
    """The model has a module the direct converter does not translate."""


def walk(model: Any) -> list[dict[str, Any]]:
    """The layers of an :class:`~edgetl.train.model.EdgeClassifier`, in order, as records holding its modules.

    ``{"op": "normalize"}``, ``{"op": "conv", "conv": Conv2d, "bn": BatchNorm2d | None, "act": ...}``,
    ``{"op": "block", "residual": bool, "layers": [...]}``, ``{"op": "mean"}``, ``{"op": "dense",
    "linear": Linear}``, each with a "name" (the module path). Shared by :func:`graph_spec` and the
    quantisation simulation of :mod:`edgetl.quantize.qat`, so both see the same graph.
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
