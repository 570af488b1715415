"""What a trial may choose: input resolution and width (the model's shape, hence its cost), and the
recipe (strategy, learning rate, label smoothing). Everything else is edgetl's default recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgetl.errors import ConfigError

STRATEGIES = ("auto", "feature-extraction", "partial", "full", "whole")  # auto races feature extraction, whole
DEFAULT_WIDTHS = (1.0, 0.5)  # ImageNet weights exist for 1.0 only: 0.5 trains from scratch and must earn its place
PRETRAINED_WIDTH = 1.0
LR = (3e-4, 3e-3)  # head learning rate, log-uniform (the default recipe: 1e-3)
LABEL_SMOOTHING = (0.0, 0.2)  # (the default recipe: 0.1)


@dataclass(frozen=True)
class Space:
    sizes: tuple[int, ...]  # input sides, smallest first
    widths: tuple[float, ...]  # MobileNetV2 width multipliers, widest first
    strategies: tuple[str, ...] = STRATEGIES
    lr: tuple[float, float] = LR
    label_smoothing: tuple[float, float] = LABEL_SMOOTHING

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The trial's choices, as :class:`edgetl.config.FinetuneConfig` fields."""
        return {
            "image_size": trial.suggest_categorical("image_size", list(self.sizes)),
            "width": trial.suggest_categorical("width", list(self.widths)),
            "strategy": trial.suggest_categorical("strategy", list(self.strategies)),
            "lr": trial.suggest_float("lr", *self.lr, log=True),
            "label_smoothing": trial.suggest_float("label_smoothing", *self.label_smoothing),
        }

    def narrowed(self, shapes: list[tuple[int, float]]) -> Space:
        """The space without the sizes and widths no shape within budget uses."""
        return Space(tuple(s for s in self.sizes if any(s == size for size, _ in shapes)),
                     tuple(w for w in self.widths if any(w == width for _, width in shapes)),
                     self.strategies, self.lr, self.label_smoothing)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_trial(shapes: list[tuple[int, float]]) -> dict[str, Any]:
    """edgetl's default recipe (``--strategy auto``, the default rates) on the widest, then largest, shape
    within budget: the point every other trial must beat."""
    size, width = max(shapes, key=lambda shape: (shape[1], shape[0]))
    return {"image_size": size, "width": width, "strategy": "auto", "lr": 1e-3, "label_smoothing": 0.1}


def build_space(accepted: tuple[int, ...], sizes: tuple[int, ...] | None, widths: tuple[float, ...] | None,
                target_width: float | None, target_name: str) -> Space:  # fmt: skip
    """The space for a target: its accepted input sides (``sizes`` narrows them, each must be one) and
    ``widths`` (default: the target's width if it fixes one, else 1.0 and 0.5)."""
    if sizes:
        refused = sorted(set(sizes) - set(accepted))
        if refused:
            raise ConfigError(f"--sizes {','.join(map(str, refused))}: {target_name} takes "
                              f"{', '.join(map(str, accepted))} only",
                              hint="add the size to the target's [input] sizes, or leave --sizes out")  # fmt: skip
    chosen = tuple(sorted(set(sizes or accepted)))
    if widths is None:
        widths = (target_width,) if target_width is not None else DEFAULT_WIDTHS
    for width in widths:
        if not 0.05 <= width <= 4.0:
            raise ConfigError(f"--widths {width}: expected 0.05..4.0")
    return Space(chosen, tuple(sorted(set(widths), reverse=True)))
