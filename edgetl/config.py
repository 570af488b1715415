"""Typed configuration for each stage. Defaults live here and nowhere else.

Precedence is one expression, highest priority on the right::

    config = FinetuneConfig.build(defaults_from_file, flags)   # defaults < file < flags

CLI options default to ``None`` and only the ones a user gave override.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any

from edgetl.errors import ConfigError


def check_keys(given: dict[str, Any], valid: set[str], where: str) -> None:
    """Raise :class:`ConfigError` for the first unknown key, suggesting the closest valid one."""
    for key in sorted(set(given) - valid):
        close = difflib.get_close_matches(key, sorted(valid), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}"
        raise ConfigError(f"unknown key {key!r} in {where}", hint=hint)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides what ``edgetl finetune`` trains. Stored resolved in the run."""

    # Model
    width: float = 1.0  # MobileNetV2 width multiplier; ImageNet weights exist for 1.0 only
    image_size: int = 224  # side of the square input
    weights: str = "imagenet"  # "imagenet", "none" or a path to a torchvision-layout state_dict
    dropout: float = 0.2  # dropout before the new classifier head
    # Phase 1: new head on a frozen backbone
    head_epochs: int = 5
    lr: float = 1e-3  # head learning rate in phase 1 (AdamW)
    # Phase 2: unfreeze and continue at a lower learning rate
    finetune_epochs: int = 10
    finetune_lr: float | None = None  # head LR in phase 2; None = lr / 10
    backbone_lr_mult: float = 0.1  # backbone LR = phase-2 head LR x this
    unfreeze_from: int | None = None  # index into `features`; None = the last third; 0 = all
    bn: str = "frozen"  # "frozen": BatchNorm stays in eval mode; "train": it updates its statistics
    warmup_epochs: float = 1.0  # linear warm-up at the start of phase 2, then cosine decay
    patience: int = 3  # phase 2 stops after this many epochs without a better validation loss
    # Optimisation
    batch_size: int = 32
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    # Train-only augmentation
    flip: bool = True  # random horizontal flip; turn off where mirroring changes the class
    min_crop_scale: float = 0.6  # random resized crop keeps at least this fraction of the area
    color_jitter: float = 0.2  # brightness / contrast / saturation jitter strength
    # Data
    val_fraction: float = 0.2  # used when DATA has no val/ split
    seed: int = 0
    # Execution
    device: str = "auto"  # "auto", "cpu" or "cuda"
    decode_workers: int | None = None  # threads decoding images; None = one per CPU
    compile: bool = False  # torch.compile the model (CUDA only; slower first epoch, faster after)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"invalid {name}={getattr(self, name)!r}: {why}")

        if not 0.05 <= self.width <= 4.0:
            raise bad("width", "expected 0.05..4.0")
        if not 16 <= self.image_size <= 1024 or self.image_size % 8:
            raise bad("image_size", "expected a multiple of 8 in 16..1024")
        for name in ("head_epochs", "finetune_epochs", "patience"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.head_epochs + self.finetune_epochs == 0:
            raise ConfigError("nothing to train: --head-epochs and --finetune-epochs are both 0")
        for name in ("lr", "backbone_lr_mult"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            raise bad("finetune_lr", "must be > 0")
        if self.unfreeze_from is not None and self.unfreeze_from < 0:
            raise bad("unfreeze_from", "must be >= 0")
        if self.bn not in ("frozen", "train"):
            raise bad("bn", "expected 'frozen' or 'train'")
        if self.batch_size < 1:
            raise bad("batch_size", "must be >= 1")
        if not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "expected 0 <= value < 1")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "expected 0 <= value < 1")
        if not 0.05 <= self.min_crop_scale <= 1:
            raise bad("min_crop_scale", "expected 0.05..1")
        if not 0 <= self.color_jitter <= 1:
            raise bad("color_jitter", "expected 0..1")
        if not 0 < self.val_fraction < 1:
            raise bad("val_fraction", "expected 0 < value < 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", "expected auto, cpu or cuda")
        if self.warmup_epochs < 0:
            raise bad("warmup_epochs", "must be >= 0")

    @property
    def phase2_head_lr(self) -> float:
        return self.finetune_lr if self.finetune_lr is not None else self.lr / 10

    @classmethod
    def build(cls, *layers: dict[str, Any]) -> FinetuneConfig:
        """Defaults, then each layer in order; ``None`` values in a layer do not override."""
        valid = {f.name for f in fields(cls)}
        merged: dict[str, Any] = {}
        for layer in layers:
            check_keys(layer, valid, "finetune configuration")
            merged.update({k: v for k, v in layer.items() if v is not None})
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
