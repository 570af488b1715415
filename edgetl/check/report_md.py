"""What a parity check tells a reader: ``parity.md`` and the next steps after an int8 model failed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgetl.check.metrics import ParityReport
from edgetl.rundir import read_manifest

# Said wherever an int8 model failed and the automatic remedies could not make it pass.
QAT_NEXT_STEP = ("For an int8 model that passes: quantisation-aware fine-tuning, `edgetl qat {run} --out {run}-qat`, "
                 "then `edgetl export {run}-qat`")  # fmt: skip


RETRAIN_NEXT_STEP = ("Every disagreement is a near-tie of the float model, and a more decisive float model has fewer: "
                     "fine-tune the whole backbone, `edgetl finetune DATA --out NEW_RUN --strategy full` (on the "
                     "sign-language digits: float top-1 95.9 % -> 99.3 %, int8 agreement 98.1-99.5 % -> 99.8-100 % "
                     "over five calibration seeds; docs/finetuning.md)")  # fmt: skip


def next_steps(run_dir: str | os.PathLike, int8: dict[str, Any]) -> list[str]:
    """What to try after an int8 model failed and the automatic remedies did not rescue it.

    When every disagreement lies in the near-tie band (:func:`near_ties`) and the run fine-tuned only
    part of its backbone, or at a reduced rate, retraining comes first: the rounding is not broken, the
    float model is undecided on those images. QAT is always listed.
    """
    steps = []
    ties = int8.get("near_ties") or {}
    stage = read_manifest(Path(run_dir))["stages"].get("finetune", {})
    config = stage.get("config", {})
    strategy = (stage.get("strategy") or {}).get("used") or config.get("strategy", "partial")
    whole = strategy in ("full", "whole") or (strategy == "partial" and config.get("unfreeze_from") == 0
                                   and config.get("backbone_lr_mult", 1.0) >= 1.0)  # fmt: skip
    partial = not whole
    if ties.get("disagreements_within") and not ties.get("disagreements_outside") and partial:
        steps.append(RETRAIN_NEXT_STEP)
    steps.append(QAT_NEXT_STEP.format(run=str(run_dir).rstrip("/")))
    return steps


def parity_markdown(report: ParityReport) -> str:
    """parity.md: the verdict table, then per artifact its near-ties and disagreements."""
    def pct(value: float) -> str:
        return f"{100 * value:.2f}%"

    t = report.thresholds
    lines = [
        "# Parity against the float PyTorch model",
        "",
        f"Data: {report.data['source']} ({report.data['count']} images, {report.data.get('root', '')}).",
        f"Thresholds: top-1 drop <= {t.max_drop} pp, agreement >= {pct(t.min_agreement)}.",
        f"Float model top-1: {pct(report.float_metrics['top1'])}"
        + (f", top-5: {pct(report.float_metrics['top5'])}" if "top5" in report.float_metrics else ""),
        *([f"Quantised models are built from the quantisation-aware weights ({report.data['quantised_from']}) "
           "and compared with the float model above, which QAT started from."]
          if report.data.get("quantised_from") else []),
        "",
        "| artifact | precision | top-1 | Δtop-1 (pp) | agreement (95 % interval) | cosine | SQNR (dB) "
        "| worst classes | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report.artifacts.items():
        sqnr = "inf" if m["sqnr_db"] is None else f"{m['sqnr_db']:.1f}"
        worst = ", ".join(f"{c} ({m['per_class'][c]['delta_pp']:+.1f})" for c in m["worst_classes"]) or "-"
        low, high = m.get("agreement_ci95", (m["agreement"], m["agreement"]))
        lines.append(
            f"| {name} | {m['precision']} | {pct(m['top1'])} | {m['delta_top1_pp']:+.2f} | "
            f"{pct(m['agreement'])} ({100 * low:.1f}–{100 * high:.1f}) | {m['cosine_mean']:.4f} | {sqnr} | {worst} | "
            f"{'pass' if m['passed'] else '**FAIL**'} |"
        )
    count = report.data["count"]
    lines += ["", f"One image is {100 / count:.2f} pp of agreement here; the interval (Wilson) is what {count} images "
              "say about the agreement on images like them."]  # fmt: skip
    for name, m in report.artifacts.items():
        lines += _disagreement_lines(name, m, count)
    return "\n".join(lines) + "\n"


def _disagreement_lines(name: str, m: dict[str, Any], count: int) -> list[str]:
    """The near-tie band and the table of images where ``name``'s top-1 differs from float."""
    lines: list[str] = []
    listed = m.get("disagreements")
    if listed:
        total = round((1 - m["agreement"]) * count)
        ties = m.get("near_ties")
        if ties:
            share = 100 * ties["images"] / count
            lines += ["", f"Near-ties for {name}: {ties['images']} images ({share:.1f} %) have a float margin below "
                      f"{ties['threshold']:.3f} (3 sigma of this model's noise on the float top-1 minus top-2 logit); "
                      f"disagreements inside that band: {ties['disagreements_within']} of {total}, outside: "
                      f"{ties['disagreements_outside']} (rounding noise rarely moves a margin further: a flip outside "
                      "points at a broken layer, see the diagnosis)."]  # fmt: skip
        lines += ["", f"## Where {name}'s top-1 differs from float ({total} of {count} images"
                  + (f", the {len(listed)} with the surest float prediction" if total > len(listed) else "") + ")",
                  "", "Float margin: the float model's top-1 logit minus its top-2: near 0, a near-tie that any "
                  "rounding can flip.", "",
                  f"| image | label | float | {name} | float margin |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| `{d['image']}` | {d['label']} | {d['float']} | {d['model']} | {d['float_margin']:.3f} |"
                  for d in listed]  # fmt: skip
    return lines


def remedies_markdown(run_dir: Path, report: dict[str, Any], remedies: list[dict[str, Any]]) -> list[str]:
    """The "int8 diagnosis and remedies" section of parity.md, ending with what to try next."""
    lines = ["", "## int8 diagnosis and remedies", ""]
    for attempt in remedies:
        if attempt["remedy"] == "diagnosis":
            if "error" in attempt:
                lines.append(f"Layer-by-layer diagnosis failed: {attempt['error']}")
                continue
            lines += ["Layers with the largest quantisation error (RMSE in units of the layer's int8 step):", "",
                      "| layer | op | RMSE / scale | max abs error |", "|---|---|---|---|"]  # fmt: skip
            lines += [f"| `{w['layer']}` | {w['op']} | {w['rmse_over_scale']:.2f} | {w['max_abs_error']:.4g} |"
                      for w in attempt.get("worst_layers", [])]  # fmt: skip
            lines.append("")
        elif "error" in attempt:  # a remedy that broke is reported as such
            lines.append(f"- {attempt['remedy']}: failed to run: {attempt['error']}")
        else:
            lines.append(
                f"- {attempt['remedy']}: top-1 {100 * attempt['top1']:.2f}%, Δ {attempt['delta_top1_pp']:+.2f} pp, "
                f"agreement {100 * attempt['agreement']:.2f}% — {'pass' if attempt['passed'] else 'fail'}"
            )
    int8 = report["artifacts"].get("model_int8.tflite")
    if int8 is not None and not int8["passed"]:
        lines += ["", *(f"- {step}." for step in next_steps(run_dir, int8))]
    else:
        lines += ["", f"{QAT_NEXT_STEP.format(run=run_dir)}."]
    return lines
