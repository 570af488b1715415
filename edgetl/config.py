"""Typed configuration for each stage. Defaults live here and nowhere else.

Precedence is one expression, highest priority on the right::

    config = FinetuneConfig.build(defaults_from_file, flags)   # defaults < file < flags

CLI options default to ``None`` and only the ones a user gave override.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgetl.errors import ConfigError


def data_dir(name: str) -> Path:
    """A data folder shipped with edgetl (``calib``, ``targets``): the source checkout's, or the
    installed copy under ``<prefix>/share/edgetl``."""
    checkout = Path(__file__).resolve().parents[1] / name
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "edgetl" / name


def check_keys(given: dict[str, Any], valid: set[str], where: str) -> None:
    """Raise :class:`ConfigError` for the first unknown key, suggesting the closest valid one."""
    for key in sorted(set(given) - valid):
        close = difflib.get_close_matches(key, sorted(valid), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}"
        raise ConfigError(f"unknown key {key!r} in {where}", hint=hint)


STRATEGIES = ("feature-extraction", "partial", "full", "whole", "auto")
RACE = ("feature-extraction", "whole")  # what "auto" races, cheapest first (edgetl.train.strategy)
PLACEMENTS = ("auto", "device", "stream")  # edgetl.train.batches


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
    # How much of the backbone phase 2 trains (edgetl.train.strategy): "feature-extraction" (the head only),
    # "partial" (features[unfreeze_from:] at backbone_lr_mult), "full" (every block, layer-wise rates,
    # thawed top-down), "whole" (every block at the head's rate from the first phase-2 epoch), or "auto"
    # (the strategies of `race`, feature extraction and whole, run the first probe_epochs of phase 2 from
    # the head-phase weights; the winner continues from where its lane stopped)
    strategy: str = "auto"
    race: tuple[str, ...] = RACE  # "auto": the strategies raced, cheapest first
    backbone_lr_mult: float = 0.1  # "partial": backbone LR = phase-2 head LR x this
    unfreeze_from: int | None = None  # "partial": index into `features`; None = the last third; 0 = all
    layer_decay: float = 0.9  # "full": each features block's LR = the next (higher) block's x this; the head's is 1
    unfreeze_epochs: int = 3  # "full": blocks are thawed from the top down over this many phase-2 epochs
    probe_epochs: int = 2  # "auto": phase-2 epochs each candidate runs before the choice
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
    data_placement: str = "auto"  # training images on a GPU: "device", "stream" or "auto" (edgetl.train.batches)
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
        if self.data_placement not in PLACEMENTS:
            raise bad("data_placement", f"expected one of {', '.join(PLACEMENTS)}")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"expected one of {', '.join(STRATEGIES)}")
        object.__setattr__(self, "race", tuple(self.race))  # a list when read back from JSON
        fixed = STRATEGIES[:-1]
        if not self.race or any(name not in fixed for name in self.race) or len(set(self.race)) < len(self.race):
            raise bad("race", f"expected distinct strategies among {', '.join(fixed)}")
        if not 0 < self.layer_decay <= 1:
            raise bad("layer_decay", "expected 0 < value <= 1")
        for name in ("unfreeze_epochs", "probe_epochs"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
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
        return {**asdict(self), "race": list(self.race)}  # as JSON holds it


@dataclass(frozen=True)
class Thresholds:
    """The parity gate: what an exported model may lose against the float model."""

    max_drop: float = 1.0  # percentage points of top-1 an artifact may lose against float
    min_agreement: float = 0.98  # share of images whose top-1 must equal the float model's

    def __post_init__(self) -> None:
        if not (self.max_drop >= 0 and 0 <= self.min_agreement <= 1):
            raise ConfigError("--max-drop must be >= 0 and --min-agreement within 0..1")

    def to_dict(self) -> dict[str, float]:
        return {"max_drop": self.max_drop, "min_agreement": self.min_agreement}

    def passes(self, metrics: dict[str, Any]) -> bool:
        """Whether an artifact's metrics (from :func:`edgetl.check.metrics.compare`) meet these thresholds."""
        return bool(metrics["delta_top1_pp"] >= -self.max_drop and metrics["agreement"] >= self.min_agreement)

    @classmethod
    def build(cls, max_drop: float | None = None, min_agreement: float | None = None) -> Thresholds:
        """The defaults, with the given values (None: keep the default)."""
        defaults = cls()
        return cls(max_drop=defaults.max_drop if max_drop is None else max_drop,
                   min_agreement=defaults.min_agreement if min_agreement is None else min_agreement)  # fmt: skip


@dataclass(frozen=True)
class ExportConfig:
    """What ``edgetl export`` builds and how the pipeline judges it."""

    int8: bool = True  # also produce the full-integer model
    calib: str = "default"  # calibration recipe: a name in calib/ or a .toml path
    calib_dir: str | None = None  # the user's own calibration images instead of a recipe
    opset: int = 17  # ONNX opset
    float_tolerance: float = 1e-4  # max abs logit difference of float exports vs PyTorch
    verify_images: int = 64  # validation images used for that float check
    remedies: bool = True  # when int8 fails parity: diagnose and try remedies
    bias_correction: bool | None = None  # None: the recipe decides (on by default)
    equalize: bool = True  # int8: equalise activation ranges in its weights first (edgetl.quantize.equalize)
    converter: str = "direct"  # TFLite route: "direct" (edgetl.export.tf_graph) or "onnx2tf"
    # int8 model's output: "uint8" (what MediaPipe and other tools take; edgetl.export.tool_metadata) or
    # "int8" (what a target's compiler wants: `output_dtype` under its [quantization])
    int8_output: str = "uint8"
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class QATConfig:
    """Quantisation-aware fine-tuning (``edgetl qat``)."""

    epochs: int = 3
    lr: float = 1e-5  # AdamW, every layer, cosine decay to 0 over the epochs
    calib: str = "default"  # recipe for the activation ranges (the export's default too)
    consistency: float = 0.0  # weight of KL(float predictions || simulated int8 predictions) in the loss
    distill: float = 4.0  # weight of KL(original model's predictions || simulated int8 predictions), T = 2

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError("qat: --epochs must be >= 1")
        if not self.lr > 0:
            raise ConfigError("qat: --lr must be > 0")
        if self.consistency < 0:
            raise ConfigError("qat: --consistency must be >= 0")
        if self.distill < 0:
            raise ConfigError("qat: --distill must be >= 0")


# ----------------------------------------------------------------------------- from a target


def finetune_layer(target: Any) -> dict[str, Any]:
    """What a target decides about training (input size, width): the layer between the defaults and
    the flags in :meth:`FinetuneConfig.build`."""
    return {"image_size": target.input.size, "width": target.model.width}


def export_config(target: Any | None, *, int8: bool | None, max_drop: float | None, min_agreement: float | None,
                  **settings: Any) -> ExportConfig:  # fmt: skip
    """An :class:`ExportConfig`. Precedence, highest on the right: defaults < target < flags (None: not given)."""
    if target is not None:
        int8 = target.precision in ("int8", "int16x8") if int8 is None else int8
        max_drop = target.parity.max_drop if max_drop is None else max_drop
        min_agreement = target.parity.min_agreement if min_agreement is None else min_agreement
        if target.quantization.mode == "int8" and target.quantization.output_dtype in ("int8", "uint8"):
            settings.setdefault("int8_output", target.quantization.output_dtype)
    return ExportConfig(int8=True if int8 is None else int8, thresholds=Thresholds.build(max_drop, min_agreement),
                        **settings)  # fmt: skip
