"""The model: torchvision's MobileNetV2 with a new head, normalisation inside, and freeze control.

:class:`EdgeClassifier` takes float RGB pixels in 0..255 (NCHW) and normalises them itself, so every
consumer (training, export, calibration, the device) feeds the same raw pixels and a mean/std mismatch
between host and device cannot happen.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
from pathlib import Path

import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from edgetl.errors import WeightsError, first_line

log = logging.getLogger(__name__)

SHARED_WEIGHTS_HINT = "../shared/weights/mobilenet_v2_imagenet_features.pth"


class EdgeClassifier(nn.Module):
    """MobileNetV2 classifier whose input is float RGB in 0..255, NCHW."""

    def __init__(
        self,
        num_classes: int,
        width: float = 1.0,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        dropout: float = 0.2,
    ):
        super().__init__()
        self.net = mobilenet_v2(num_classes=num_classes, width_mult=width, dropout=dropout)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)

    @property
    def features(self) -> nn.Sequential:
        return self.net.features

    @property
    def head(self) -> nn.Module:
        return self.net.classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels - self.mean) / self.std)


def default_unfreeze_from(model: EdgeClassifier) -> int:
    """The first block of the last third of ``features``."""
    return (2 * len(model.features)) // 3


def set_trainable(model: EdgeClassifier, phase: int, unfreeze_from: int) -> None:
    """Phase 1: only the head has gradients. Phase 2: the head and ``features[unfreeze_from:]``."""
    for param in model.features.parameters():
        param.requires_grad = False
    if phase == 2:
        for block in model.features[unfreeze_from:]:
            for param in block.parameters():
                param.requires_grad = True
    for param in model.head.parameters():
        param.requires_grad = True


def set_train_mode(model: EdgeClassifier, phase: int, unfreeze_from: int, bn: str) -> None:
    """Put the model in training mode without letting frozen BatchNorm statistics move.

    Frozen blocks always run in eval mode. In phase 2 with ``bn == "frozen"`` the BatchNorm layers of
    the unfrozen blocks stay in eval mode too (their affine weights still train).
    """
    model.train()
    first_trainable = len(model.features) if phase == 1 else unfreeze_from
    for block in model.features[:first_trainable]:
        block.eval()
    if phase == 2 and bn == "frozen":
        for module in model.features.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a firewalled network must fail, not hang
    try:
        # torch.hub announces each download attempt on stdout, which would corrupt --json output.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, OSError, hash mismatch: all mean "not available"
        reason = first_line(exc)
        raise WeightsError(
            f"torchvision's ImageNet weights for MobileNetV2 are not cached and could not be "
            f"downloaded ({reason})",
            hint=f"use --weights PATH with a local state_dict (e.g. {SHARED_WEIGHTS_HINT}) "
            "or --weights none to train from scratch",
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist",
            hint="--weights takes 'imagenet', 'none' or a path to a state_dict",
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot load weights from {path}: {first_line(exc)}") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers, edgetl's own included
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    edgetl_layout = any(k.startswith("net.") for k in data)
    cleaned = {}
    for key, value in data.items():
        if edgetl_layout and key in ("mean", "std"):
            continue  # EdgeClassifier's normalisation buffers, not weights
        for prefix in ("module.", "net."):
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def load_initial_weights(model: EdgeClassifier, weights: str, width: float) -> str:
    """Load the backbone from ``weights``: ``"imagenet"``, ``"none"`` or a file path.

    The classifier head is always new; the file may hold a whole torchvision model or only
    ``features.*``.

    Returns:
        A short description of what was loaded, for the run's record.

    Raises:
        WeightsError: weights unavailable, unreadable, or not matching the model (e.g. another width).
    """
    if weights == "none":
        return "none (random initialisation)"
    if weights == "imagenet":
        if width != 1.0:
            raise WeightsError(
                f"torchvision has ImageNet weights for MobileNetV2 width 1.0 only, not {width}",
                hint="use --width 1.0, --weights PATH or --weights none",
            )
        state, source = _imagenet_state_dict(), "imagenet (torchvision IMAGENET1K_V1)"
    else:
        path = Path(weights).expanduser()
        state, source = _file_state_dict(path), str(path)

    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    unexpected = sorted(k for k in state if not k.startswith(("features.", "classifier.")))
    if unexpected:
        raise WeightsError(
            f"weights from {source} are not a torchvision MobileNetV2 state_dict "
            f"(unexpected keys such as {unexpected[0]!r})"
        )
    expected = model.net.features.state_dict()
    missing = sorted(set(f"features.{k}" for k in expected) - set(backbone))
    if missing:
        raise WeightsError(
            f"weights from {source} lack {len(missing)} backbone tensors (e.g. {missing[0]!r})"
        )
    for key, tensor in backbone.items():
        want = expected.get(key.removeprefix("features."))
        if want is None:
            raise WeightsError(f"weights from {source} have an unknown backbone tensor {key!r}")
        if want.shape != tensor.shape:
            raise WeightsError(
                f"weights from {source} do not fit MobileNetV2 width {width}: {key} is "
                f"{tuple(tensor.shape)} in the file but {tuple(want.shape)} in the model",
                hint="pass the --width the weights were trained with",
            )
    model.net.features.load_state_dict({k.removeprefix("features."): v for k, v in backbone.items()})
    log.info("loaded backbone weights from %s (%d tensors)", source, len(backbone))
    return source
