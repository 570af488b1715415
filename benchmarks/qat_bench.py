"""int8 parity before and after quantisation-aware fine-tuning (`edgetl qat`) of a finished run.

Exports a copy of the run as it is (post-training quantisation, edgetl's defaults, no remedies),
then runs ``edgetl qat`` on it and exports the QAT run the same way. Reports, on the run's validation
split: float top-1 of both float models; int8 top-1, Δtop-1 and agreement against each run's own float
model (what ``edgetl check`` gates on) and against the *original* float model; QAT's time.
Writes ``results/qat_bench_<tag>.{json,md}``.

    python benchmarks/qat_bench.py --run RUN_DIR [--epochs 2] [--tag sign_language] [--keep DIR]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finished_run, machine, write_result  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--consistency", type=float, default=0.0)
    parser.add_argument("--tag", default="sign_language")
    parser.add_argument("--keep", default=None, help="keep the exported copies in this folder")
    args = parser.parse_args()
    run = finished_run(args.run)
    if run is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from edgetl.artifacts import read_manifest
    from edgetl.export import ExportConfig, export
    from edgetl.parity import Thresholds, evaluation_set, runner_for, torch_logits
    from edgetl.qat import QATConfig, quantization_aware_finetune
    from edgetl.train import load_checkpoint

    cfg = ExportConfig(remedies=False, thresholds=Thresholds())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        ptq, qat = work / "ptq", work / "qat"
        for path in (ptq, qat):
            shutil.rmtree(path, ignore_errors=True)
        skip = shutil.ignore_patterns("checkpoints", ".export-work", "bundles", "model*.tflite", "model.onnx")
        shutil.copytree(run, ptq, ignore=skip)
        before = export(ptq, cfg)
        t0 = time.perf_counter()
        settings = QATConfig(epochs=args.epochs, lr=args.lr, consistency=args.consistency)
        record = quantization_aware_finetune(ptq, qat, settings)
        qat_seconds = time.perf_counter() - t0
        after = export(qat, cfg)

        val, description, _, _ = evaluation_set(ptq, read_manifest(ptq), None)
        original = torch_logits(load_checkpoint(ptq)[0], val.images).argmax(1)

        def row(result, run_dir: Path) -> dict:
            own = result.parity.artifacts["model_int8.tflite"]
            int8 = runner_for(run_dir / "model_int8.tflite")(val.images).argmax(1)
            return {
                "float_top1": result.parity.float_metrics["top1"],
                "int8_top1": own["top1"],
                "int8_delta_top1_pp": own["delta_top1_pp"],
                "int8_agreement_own_float": own["agreement"],
                "int8_agreement_original_float": float((int8 == original).mean()),
                "passed": own["passed"],
            }

        rows = {"post-training quantisation": row(before, ptq),
                f"after `edgetl qat` ({args.epochs} epochs)": row(after, qat)}  # fmt: skip

    info = machine()
    lines = [
        f"# int8 parity before and after quantisation-aware fine-tuning: {args.tag}",
        "",
        f"Run: {run}. Validation images: {description['count']} ({description['source']}).",
        f"Machine: {info['cpu']}, {info['cpus']} CPUs. One run each; edgetl export defaults (direct converter,",
        "equalisation, bias correction, default calibration recipe), no remedies.",
        "Targets (issue #3): Δ ≤ 0.5 pp, agreement ≥ 99 %.",
        f"QAT: {args.epochs} epochs, AdamW lr {args.lr:g} with cosine decay, consistency weight {args.consistency:g}, "
        f"{qat_seconds:.0f} s on this machine.",
        "",
        "| model | float top-1 | int8 top-1 | Δtop-1 (pp) vs own float | agreement vs own float | "
        "agreement vs original float | gate |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {100 * r['float_top1']:.2f}% | {100 * r['int8_top1']:.2f}% | "
                     f"{r['int8_delta_top1_pp']:+.2f} | {100 * r['int8_agreement_own_float']:.2f}% | "
                     f"{100 * r['int8_agreement_original_float']:.2f}% | "
                     f"{'pass' if r['passed'] else 'fail'} |")  # fmt: skip
    lines += ["", "Simulated int8 during QAT (val split, agreement with the original float model):", ""]
    lines += [f"- epoch {h['epoch']}: float top-1 {100 * h['float']['top1']:.2f}%, simulated int8 top-1 "
              f"{100 * h['simulated_int8']['top1']:.2f}%, agreement {100 * h['simulated_int8']['agreement']:.2f}%"
              for h in record["history"]]  # fmt: skip
    payload = {"machine": info, "run": str(run), "epochs": args.epochs, "lr": args.lr,
               "consistency": args.consistency, "qat_seconds": qat_seconds,
               "rows": rows, "qat_history": record["history"], "validation": description}  # fmt: skip
    write_result(f"qat_bench_{args.tag}", payload, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
