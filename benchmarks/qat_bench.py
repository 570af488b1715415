"""int8 parity before and after quantisation-aware fine-tuning (`edgetl qat`) of a finished run.

Exports a copy of the run as it is (post-training quantisation, edgetl's defaults, no remedies),
then runs ``edgetl qat`` on it and exports the QAT run the same way (its int8 model is built from the
QAT weights; its float model, the parity reference, is the original). Reports, on the run's validation
split: int8 top-1, Δtop-1, top-1 agreement and logit SQNR against the original float model (what
``edgetl check`` gates on), the QAT weights' own float top-1, and QAT's time.
Writes ``results/qat_bench_<tag>.{json,md}``.

    python benchmarks/qat_bench.py --run RUN_DIR [--epochs 3] [--lr 1e-5] [--distill 4] [--consistency 0]
                                   [--tag sign_language] [--keep DIR]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finished_run, machine, write_result  # noqa: E402


def main() -> int:
    from edgetl.config import QATConfig  # the defaults of `edgetl qat`

    defaults = QATConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--consistency", type=float, default=defaults.consistency)
    parser.add_argument("--distill", type=float, default=defaults.distill)
    parser.add_argument("--tag", default="sign_language")
    parser.add_argument("--keep", default=None, help="keep the exported copies in this folder")
    args = parser.parse_args()
    run = finished_run(args.run)
    if run is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        m = _measure(run, Path(args.keep) if args.keep else Path(tmp), args)
    info = machine()
    payload = {"machine": info, "run": str(run), "epochs": args.epochs, "lr": args.lr,
               "consistency": args.consistency, "distill": args.distill, "qat_seconds": m["qat_seconds"],
               "rows": m["rows"], "margins_below_0_5": float((m["margins"] < 0.5).mean()),
               "qat_history": m["record"]["history"], "validation": m["description"]}  # fmt: skip
    write_result(f"qat_bench_{args.tag}", payload, "\n".join(_markdown(args, run, info, m)) + "\n")
    return 0


def _measure(run: Path, work: Path, args: argparse.Namespace) -> dict:
    """Post-training int8 of a copy of ``run``, then `edgetl qat` of it and the QAT run's int8, both gated."""
    from edgetl.config import ExportConfig, QATConfig, Thresholds
    from edgetl.pipeline import export_and_check
    from edgetl.quantize.qat import quantization_aware_finetune

    cfg = ExportConfig(remedies=False, thresholds=Thresholds())
    ptq, qat = work / "ptq", work / "qat"
    for path in (ptq, qat):
        shutil.rmtree(path, ignore_errors=True)
    skip = shutil.ignore_patterns("checkpoints", ".export-work", "bundles", "model*.tflite", "model.onnx")
    shutil.copytree(run, ptq, ignore=skip)
    before = export_and_check(ptq, cfg)
    t0 = time.perf_counter()
    settings = QATConfig(epochs=args.epochs, lr=args.lr, consistency=args.consistency, distill=args.distill)
    record = quantization_aware_finetune(ptq, qat, settings)
    qat_seconds = time.perf_counter() - t0
    after = export_and_check(qat, cfg)
    description, margins, flipped = _flips(ptq)
    rows = {"post-training quantisation": _row(before, flipped(ptq)),
            f"after `edgetl qat` ({args.epochs} epochs)": _row(after, flipped(qat))}  # fmt: skip
    return {"rows": rows, "record": record, "qat_seconds": qat_seconds, "description": description,
            "margins": margins}  # fmt: skip


def _flips(ptq: Path):
    """The float model's top-1 minus top-2 logit per validation image, and a function giving those of the
    images a run's int8 model flips: how close to a tie they are."""
    from edgetl.check.runners import runner_for
    from edgetl.data.heldout import evaluation_set
    from edgetl.rundir import read_manifest
    from edgetl.train.checkpoint import load_checkpoint
    from edgetl.train.loop import torch_logits

    val, description, _, _ = evaluation_set(ptq, read_manifest(ptq), None)
    reference = torch_logits(load_checkpoint(ptq)[0], val.images)
    ordered = np.sort(reference, axis=1)
    margins = ordered[:, -1] - ordered[:, -2]

    def flipped(run_dir: Path) -> list[float]:
        int8 = runner_for(run_dir / "model_int8.tflite")(val.images)
        return sorted(round(float(m), 3) for m in margins[int8.argmax(1) != reference.argmax(1)])

    return description, margins, flipped


def _row(result, flipped: list[float]) -> dict:
    own = result.parity.artifacts["model_int8.tflite"]
    return {
        "float_top1": result.parity.float_metrics["top1"],
        "int8_top1": own["top1"],
        "int8_delta_top1_pp": own["delta_top1_pp"],
        "int8_agreement": own["agreement"],
        "int8_sqnr_db": own["sqnr_db"],
        "passed": own["passed"],
        "flipped_float_margins": flipped,
    }


def _markdown(args: argparse.Namespace, run: Path, info: dict, m: dict) -> list[str]:
    rows, record, margins, description = m["rows"], m["record"], m["margins"], m["description"]
    lines = [
        f"# int8 parity before and after quantisation-aware fine-tuning: {args.tag}",
        "",
        f"Run: {run}. Validation images: {description['count']} ({description['source']}).",
        f"Machine: {info['cpu']}, {info['cpus']} CPUs. One run each; edgetl export defaults (direct converter,",
        "equalisation, default calibration recipe; bias correction for the post-training model only), no remedies.",
        "Targets (issue #3): Δ ≤ 0.5 pp, agreement ≥ 99 %.",
        f"QAT: {args.epochs} epochs, AdamW lr {args.lr:g} with cosine decay, consistency weight {args.consistency:g}, "
        f"distillation weight {args.distill:g}, {m['qat_seconds']:.0f} s on this machine.",
        "",
        "Every figure against the original float model (the parity reference of both runs).",
        "",
        "| int8 model | float top-1 | int8 top-1 | Δtop-1 (pp) | agreement | logit SQNR (dB) | gate |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {100 * r['float_top1']:.2f}% | {100 * r['int8_top1']:.2f}% | "
                     f"{r['int8_delta_top1_pp']:+.2f} | {100 * r['int8_agreement']:.2f}% | {r['int8_sqnr_db']:.1f} | "
                     f"{'pass' if r['passed'] else 'fail'} |")  # fmt: skip
    lines += ["", "Float top-1 minus top-2 logit of the images whose int8 prediction differs (for scale: "
              f"{100 * float((margins < 0.5).mean()):.1f} % of the {len(margins)} images have a margin below 0.5):", ""]
    lines += [f"- {name}: {', '.join(f'{x:.2f}' for x in r['flipped_float_margins'])}" for name, r in rows.items()]
    lines += ["", f"The QAT weights run in float: top-1 {100 * record['after']['float']['top1']:.2f}% "
              "(not exported; the int8 model is built from them)."]
    lines += ["", "Simulated int8 during QAT (val split, agreement with the original float model):", ""]
    lines += [f"- epoch {h['epoch']}: float top-1 {100 * h['float']['top1']:.2f}%, simulated int8 top-1 "
              f"{100 * h['simulated_int8']['top1']:.2f}%, agreement {100 * h['simulated_int8']['agreement']:.2f}%"
              for h in record["history"]]  # fmt: skip
    return lines


if __name__ == "__main__":
    sys.exit(main())
