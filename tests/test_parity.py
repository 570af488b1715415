"""edgetl.check.parity's metrics and report: agreement interval, the listed disagreements."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.check.metrics import LISTED_DISAGREEMENTS, ParityReport, compare, wilson_interval
from edgetl.check.report_md import parity_markdown
from edgetl.config import Thresholds


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))  # 1.96^2 / (10 + 1.96^2)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == 1.0
    low, high = wilson_interval(406, 411)
    assert 0.97 < low < 406 / 411 < high < 0.996


def _case():
    reference = np.array([[5.0, 0.0, 0.0], [0.0, 1.0, 0.9], [0.0, 0.0, 3.0], [2.0, 1.9, 0.0]], np.float32)
    logits = reference.copy()
    logits[1] = [0.0, 0.9, 1.0]  # a near-tie flips (float margin 0.1)
    logits[2] = [4.0, 0.0, 3.0]  # a confident prediction flips (margin 3)
    labels = np.array([0, 1, 2, 0])
    paths = [f"/data/set/{c}/img{i}.jpg" for i, c in enumerate("abca")]
    return reference, logits, labels, paths


def test_compare_lists_disagreements_surest_first():
    reference, logits, labels, paths = _case()
    metrics = compare(reference, logits, labels, ["a", "b", "c"], paths, "/data/set")
    assert metrics["agreement"] == 0.5
    assert metrics["disagreements"] == [
        {"image": "c/img2.jpg", "label": "c", "float": "c", "model": "a", "float_margin": 3.0},
        {"image": "b/img1.jpg", "label": "b", "float": "b", "model": "c", "float_margin": pytest.approx(0.1, 1e-3)},
    ]
    low, high = metrics["agreement_ci95"]
    assert low < 0.5 < high
    assert "disagreements" not in compare(reference, logits, labels, ["a", "b", "c"])  # no paths, no list


def test_compare_lists_at_most_the_limit():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(100, 4))
    logits = -reference  # every image flips
    labels = reference.argmax(1)
    metrics = compare(reference, logits, labels, list("abcd"), [f"x/{i}.png" for i in range(100)], "elsewhere")
    listed = metrics["disagreements"]
    assert len(listed) == LISTED_DISAGREEMENTS
    margins = [d["float_margin"] for d in listed]
    top2 = np.sort(reference, axis=1)[:, -2:]
    surest = int(np.argmax(top2[:, 1] - top2[:, 0]))
    assert margins == sorted(margins, reverse=True) and listed[0]["image"] == f"{surest}.png"  # not under root


def test_report_shows_interval_and_disagreements():
    reference, logits, labels, paths = _case()
    classes = ["a", "b", "c"]
    int8 = {**compare(reference, logits, labels, classes, paths, "/data/set"), "format": "tflite",
            "precision": "int8", "passed": False}  # fmt: skip
    same = {**compare(reference, reference, labels, classes, paths, "/data/set"), "format": "onnx",
            "precision": "float32", "passed": True}  # fmt: skip
    report = ParityReport(passed=False, thresholds=Thresholds(), data={"source": "val split", "count": 4},
                          float_metrics=compare(reference, reference, labels, classes),
                          artifacts={"model.onnx": same, "model_int8.tflite": int8})  # fmt: skip
    text = parity_markdown(report)
    assert "## Where model_int8.tflite's top-1 differs from float (2 of 4 images)" in text
    assert "| `c/img2.jpg` | c | c | a | 3.000 |" in text
    assert "model.onnx's top-1 differs" not in text  # nothing to list
    assert "One image is 25.00 pp of agreement here" in text
    low, high = int8["agreement_ci95"]
    assert f"50.00% ({100 * low:.1f}–{100 * high:.1f})" in text


def test_near_ties_band_separates_noise_from_a_broken_prediction():
    rng = np.random.default_rng(1)
    reference = rng.normal(scale=2.0, size=(400, 5))
    logits = reference + rng.normal(scale=0.1, size=reference.shape)  # rounding-like noise on every logit
    sure = int(np.argmax(np.diff(np.sort(reference, 1)[:, -2:], axis=1)))
    logits[sure] = -reference[sure]  # one confident prediction broken outright
    labels = reference.argmax(1)
    metrics = compare(reference, logits, labels, list("abcde"), [f"{i}.png" for i in range(400)], None)
    ties = metrics["near_ties"]
    # noise on a difference of two logits: 0.1 * sqrt(2); the broken image does not inflate it
    assert ties["margin_noise_sigma"] == pytest.approx(0.1 * 2**0.5, rel=0.15)
    ranked = np.sort(reference, 1)
    assert ties["images"] == int((ranked[:, -1] - ranked[:, -2] < ties["threshold"]).sum())
    total = round((1 - metrics["agreement"]) * 400)
    assert total >= 3 and ties["disagreements_outside"] == 1  # the broken one; the flips of noise are inside
    assert ties["disagreements_within"] == total - 1
    report = ParityReport(passed=True, thresholds=Thresholds(), data={"source": "val split", "count": 400},
                          float_metrics=compare(reference, reference, labels, list("abcde")),
                          artifacts={"model_int8.tflite": {**metrics, "format": "tflite", "precision": "int8",
                                                           "passed": True}})  # fmt: skip
    assert f"disagreements inside that band: {total - 1} of {total}, outside: 1 " in parity_markdown(report)


@pytest.mark.parametrize(
    ("config", "outside", "retrain_first"),
    [
        ({"unfreeze_from": None, "backbone_lr_mult": 0.1}, 0, True),  # edgetl's defaults, only near-ties
        ({"unfreeze_from": 0, "backbone_lr_mult": 0.1}, 0, True),  # whole backbone, but at a tenth of the rate
        ({"unfreeze_from": 0, "backbone_lr_mult": 1.0}, 0, False),  # already trained the whole backbone
        ({"unfreeze_from": None, "backbone_lr_mult": 0.1}, 1, False),  # a confident flip: not a near-tie problem
    ],
)
def test_next_steps_suggest_retraining_only_for_near_ties(monkeypatch, config, outside, retrain_first):
    import edgetl.check.report_md as parity

    monkeypatch.setattr(parity, "read_manifest", lambda run: {"stages": {"finetune": {"config": config}}})
    int8 = {"passed": False, "near_ties": {"disagreements_within": 5, "disagreements_outside": outside}}
    steps = parity.next_steps("runs/x/", int8)
    assert (steps[0] == parity.RETRAIN_NEXT_STEP) is retrain_first
    assert steps[-1] == parity.QAT_NEXT_STEP.format(run="runs/x") and len(steps) == 1 + retrain_first


@pytest.mark.parametrize("flipped, passes", [(1, True), (2, False)])
def test_losing_exactly_the_allowed_drop_passes(flipped, passes):
    """1 image of 100 is exactly 1.0 point: the default limit allows it (as a float difference of
    means, 100 * (0.99 - 1.0) is -1.0000000000000009 and failed it)."""
    labels = np.arange(100) % 2
    reference = np.eye(2)[labels] * 3.0
    logits = reference.copy()
    logits[:flipped] = logits[:flipped, ::-1]
    metrics = compare(reference, logits, labels, ["a", "b"])
    assert metrics["delta_top1_pp"] == -float(flipped)
    assert Thresholds(max_drop=float(flipped), min_agreement=0.0).passes(metrics)
    assert Thresholds(max_drop=1.0, min_agreement=0.98).passes(metrics) is passes
