"""Parity metrics of a model's logits against the float model's, on the same images: top-1 (top-5 with
>= 5 classes), Δtop-1, top-1 agreement with its Wilson interval, logit cosine and SQNR, per-class Δ and
the worst classes, the near-tie band and the images whose top-1 differs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.config import Thresholds
from edgetl.errors import ExitCode


@dataclass
class ParityReport:
    """The verdict on every artifact of a run, and the evidence it stands on."""

    passed: bool
    thresholds: Thresholds
    data: dict[str, Any]  # source, root, count, sha256 of the images (edgetl.data.heldout)
    float_metrics: dict[str, Any]
    artifacts: dict[str, dict[str, Any]]  # file -> metrics + "passed" + "format"/"precision"

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.passed else ExitCode.PARITY_FAILED

    def evidence(self) -> dict[str, Any]:
        """What the verdict stands on: the data (source, count, content sha256) and the thresholds."""
        return {"data": dict(self.data), "thresholds": self.thresholds.to_dict()}

    def failed(self) -> list[str]:
        return [name for name, a in self.artifacts.items() if not a["passed"]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "thresholds": self.thresholds.to_dict(),
            "data": self.data,
            "float": self.float_metrics,
            "artifacts": self.artifacts,
        }

LISTED_DISAGREEMENTS = 20


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % (``z`` = 1.96) Wilson score interval of a proportion: what ``successes`` of ``total`` images
    says about the rate on images like them (unlike the normal approximation, sensible near 0 and 1)."""
    if total == 0:
        return 0.0, 1.0
    p, zz = successes / total, z * z / total
    centre = (p + zz / 2) / (1 + zz)
    half = z / (1 + zz) * math.sqrt(p * (1 - p) / total + zz / (4 * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def _image_name(path: str, root: str | None) -> str:
    if root:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            pass
    return Path(path).name


def compare(
    reference: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    paths: list[str] | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """Metrics of ``logits`` against the float ``reference`` logits and the true ``labels``.

    With ``paths`` (one per image; shown relative to ``root``), the images whose top-1 differs from the
    float model's are listed, those the float model was surest of first, with its margin (top-1 minus
    top-2 logit): a flip of a near-tie is noise, a flip of a confident prediction is a broken layer.
    """
    pred, ref_pred = logits.argmax(1), reference.argmax(1)
    agree = pred == ref_pred
    error = reference - logits
    cosine = np.sum(reference * logits, 1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(logits, axis=1) + 1e-12
    )
    noise = float(np.sum(error**2))
    sqnr = math.inf if noise == 0 else 10 * math.log10(float(np.sum(reference**2)) / noise)
    per_class = {}
    for index, name in enumerate(classes):
        mask = labels == index
        if mask.any():
            hits, ref_hits = int((pred[mask] == index).sum()), int((ref_pred[mask] == index).sum())
            count = int(mask.sum())
            per_class[name] = {"top1": hits / count, "delta_pp": 100 * (hits - ref_hits) / count, "count": count}
    worst = sorted(per_class, key=lambda c: per_class[c]["delta_pp"])[:3]
    hits, ref_hits = int((pred == labels).sum()), int((ref_pred == labels).sum())
    metrics = {
        "count": int(len(labels)),
        "top1": hits / len(labels),
        # from counts: 100 * (0.99 - 1.0) is -1.0000000000000009, which would fail a 1.0-point limit
        "delta_top1_pp": 100 * (hits - ref_hits) / len(labels),
        "agreement": float(agree.mean()),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "sqnr_db": sqnr if math.isfinite(sqnr) else None,
        "max_abs_logit_diff": float(np.abs(error).max()),
        "per_class": per_class,
        "worst_classes": [c for c in worst if per_class[c]["delta_pp"] < 0],
    }
    if len(classes) >= 5:
        top5 = np.argsort(-logits, 1)[:, :5]
        metrics["top5"] = float((top5 == labels[:, None]).any(1).mean())
    metrics["agreement_ci95"] = [round(bound, 4) for bound in wilson_interval(int(agree.sum()), len(labels))]
    if paths is not None:
        metrics.update(_disagreements(reference, logits, labels, classes, [_image_name(p, root) for p in paths]))
    return metrics


def _disagreements(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray, classes: list[str],
                   names: list[str]) -> dict[str, Any]:  # fmt: skip
    """The near-tie band and the images whose top-1 differs from float, the float model's surest first."""
    pred, ref_pred = logits.argmax(1), reference.argmax(1)
    agree = pred == ref_pred
    found: dict[str, Any] = {}
    margin = np.zeros(len(reference))
    if reference.shape[1] > 1:
        rows, top = np.arange(len(reference)), np.argsort(-reference, axis=1)[:, :2]
        margin = reference[rows, top[:, 0]] - reference[rows, top[:, 1]]
        found["near_ties"] = near_ties(logits[rows, top[:, 0]] - logits[rows, top[:, 1]], margin, agree)
    flipped = np.flatnonzero(~agree)
    flipped = flipped[np.argsort(-margin[flipped], kind="stable")]
    found["disagreements"] = [
        {"image": names[i], "label": classes[labels[i]], "float": classes[ref_pred[i]],
         "model": classes[pred[i]], "float_margin": round(float(margin[i]), 4)}
        for i in flipped[:LISTED_DISAGREEMENTS]
    ]  # fmt: skip
    return found


def near_ties(moved: np.ndarray, margin: np.ndarray, agree: np.ndarray) -> dict[str, Any]:
    """How many images are near-ties at this model's noise level, and how many disagreements they hold.

    ``margin``: the float model's top-1 minus top-2 logit per image; ``moved``: the same two classes'
    logit difference in the model under test; ``agree``: whether the two top-1s agree. The noise is
    measured where it decides top-1: on that margin, as the model under test moves it (sigma: 1.4826 x
    its median absolute deviation over all images, the standard deviation of Gaussian noise, which a
    few broken predictions cannot inflate). An image whose float margin is below 3 sigma can flip by
    noise alone; Gaussian noise moves a margin further than that once in 370 draws, so disagreements
    outside the band are what a broken layer or a biased range looks like. The share of near-ties is a
    property of the *float* model: a more decisive float model has fewer of them for the same
    quantisation noise.
    """
    change = moved - margin
    sigma = 1.4826 * float(np.median(np.abs(change - np.median(change))))
    near = margin < 3 * sigma
    return {
        "margin_noise_sigma": round(sigma, 4),
        "threshold": round(3 * sigma, 4),
        "images": int(near.sum()),
        "disagreements_within": int((~agree & near).sum()),
        "disagreements_outside": int((~agree & ~near).sum()),
    }
