"""Charts of a run, written as PNG files (matplotlib, Agg backend, imported lazily).

matplotlib's own warnings (a class name in a script its font lacks: "Glyph ... missing"; a layout too
tight for long names) are kept off the terminal: each chart function logs them at debug level
(``edgetl -vv``) instead. The chart is still written; labels.txt and the report name the classes right.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edgetl.rundir import atomic_path

log = logging.getLogger(__name__)
Chart = TypeVar("Chart", bound=Callable[..., None])


def _quiet(chart: Chart) -> Chart:
    """Run a chart function with matplotlib's warnings (Python warnings and its logger) logged at debug."""

    @functools.wraps(chart)
    def quiet(*args: Any, **kwargs: Any) -> None:
        mpl_log = logging.getLogger("matplotlib")
        level = mpl_log.level
        mpl_log.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                chart(*args, **kwargs)
        finally:
            mpl_log.setLevel(level)
        for message in {str(w.message) for w in caught}:
            log.debug("%s: %s", chart.__name__, message)

    return quiet  # type: ignore[return-value]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    fig.clf()


@_quiet
def training_curves(history: list[dict[str, Any]], head_epochs: int, path: str | Path) -> None:
    """Loss and accuracy per epoch, train and val, with the phase boundary marked."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "top-1 accuracy")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "s-", label="val")
        if 0 < head_epochs < (epochs[-1] if epochs else 0):
            ax.axvline(head_epochs + 0.5, color="grey", linestyle="--")
            ax.text(head_epochs + 0.5, 0.98, " unfreeze", transform=ax.get_xaxis_transform(),
                    va="top", color="grey")  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


@_quiet
def confusion_matrix(matrix: list[list[int]], classes: list[str], path: str | Path) -> None:
    """Confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    plt = _pyplot()
    n = len(classes)
    size = min(16, 2 + 0.6 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                color = "white" if matrix[i][j] > peak / 2 else "black"
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_title("validation confusion matrix")
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


@_quiet
def per_class_bars(classes: list[str], series: dict[str, list[float]], path: str | Path) -> None:
    """Per-class top-1 (%) of the float model and each artifact, side by side."""
    import numpy as np

    plt = _pyplot()
    n, k = len(classes), len(series)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * n * k + 2), 4))
    width = 0.8 / max(k, 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(n) + (i - (k - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 105)
    ax.set_title("per-class accuracy: float vs exported")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
