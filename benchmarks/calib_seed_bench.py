"""How much the int8 parity of one run depends on which calibration images were drawn.

One export is one sample: the calibration recipe's seed picks the images that set every int8 range
(and the equalisation scales, and the bias corrections). This script exports copies of a finished run
with the default recipe under several seeds (everything else as ``edgetl export`` does it, no remedies)
and reports, per seed and over all of them, the int8 model's top-1, Δtop-1, top-1 agreement and logit
SQNR against the float model on the validation split; ``--no-equalize`` adds the same sweep without
range equalisation. Writes ``results/calib_seed_bench_<tag>.{json,md}``.

    python benchmarks/calib_seed_bench.py [--run /work/runs/sl_default] [--seeds 0 1 2 3 4] [--no-equalize]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finished_run, machine, training_settings, write_result  # noqa: E402

CALIB = Path(__file__).resolve().parents[1] / "calib"
KEYS = ("top1", "delta_top1_pp", "agreement", "sqnr_db", "passed")


def _toml(value: object) -> str:
    """A recipe value (str, int, float or bool) as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def _correction(summary: dict) -> str:
    """The kept activation bias correction and the candidates' held-out SQNR, as one table cell."""
    scores = summary.get("held_out_sqnr_db")
    if not scores:
        return "—"
    names = {"sequential": "layer by layer", "output_layer": "output layer", "uncorrected": "none"}
    order = ("sequential", "output_layer", "uncorrected")
    return f"{names[summary['kept']]} ({' / '.join(f'{scores[n]:.1f}' if n in scores else '—' for n in order)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/work/runs/sl_default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--no-equalize", action="store_true", help="also sweep without range equalisation")
    parser.add_argument("--tag", default="sign_language")
    args = parser.parse_args()
    run = finished_run(args.run)
    if run is None:
        return 0
    logging.basicConfig(level=logging.WARNING)
    settings = [True, False] if args.no_equalize else [True]
    rows, count = _sweep(run, args.seeds, settings)
    info = machine()
    summary = {("on" if equalize else "off"): _summary([r for r in rows if r["equalize"] == equalize])
               for equalize in settings}  # fmt: skip
    lines = _markdown(args.tag, run, count, info, rows, summary)
    payload = {"machine": info, "run": str(run), "training": training_settings(run), "images": count,
               "rows": rows, "summary": summary}  # fmt: skip
    write_result(f"calib_seed_bench_{args.tag}", payload, "\n".join(lines) + "\n")
    return 0


def _sweep(run: Path, seeds: list[int], settings: list[bool]) -> tuple[list[dict], int]:
    """One export of a copy of ``run`` per (equalisation, seed); returns the int8 rows and the image count."""
    from edgetl.config import ExportConfig
    from edgetl.pipeline import export_and_check
    from edgetl.rundir import read_manifest

    recipe = tomllib.loads((CALIB / "default.toml").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        skip = shutil.ignore_patterns("checkpoints", ".export-work", "bundles", "model*.tflite", "model.onnx")
        for equalize in settings:
            for seed in seeds:
                path = Path(tmp) / f"seed{seed}.toml"
                path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in {**recipe, "seed": seed}.items()))
                work = Path(tmp) / f"run-{seed}-{equalize}"
                shutil.copytree(run, work, ignore=skip)
                result = export_and_check(work, ExportConfig(calib=str(path), equalize=equalize, remedies=False))
                int8 = result.parity.artifacts["model_int8.tflite"]
                corrected = read_manifest(work)["stages"]["export"]["bias_correction"] or {}
                rows.append({"seed": seed, "equalize": equalize, **{k: int8[k] for k in KEYS},
                             "activation_correction": corrected.get("activations", {})})  # fmt: skip
                print(f"seed {seed} equalize {equalize}: " + ", ".join(f"{k} {int8[k]}" for k in KEYS), flush=True)
                shutil.rmtree(work)
    return rows, result.parity.data["count"]


def _summary(group: list[dict]) -> dict:
    agreement = [r["agreement"] for r in group]
    delta = [r["delta_top1_pp"] for r in group]
    sqnr = [r["sqnr_db"] for r in group]
    return {
        "exports": len(group),
        "agreement_min": min(agreement), "agreement_max": max(agreement),
        "agreement_mean": sum(agreement) / len(group),
        "delta_min": min(delta), "delta_max": max(delta),
        "sqnr_min": min(sqnr), "sqnr_max": max(sqnr),
        "agreement_target_met": sum(a >= 0.99 for a in agreement),
        "delta_target_met": sum(d >= -0.5 for d in delta),
    }  # fmt: skip


def _markdown(tag: str, run: Path, count: int, info: dict, rows: list[dict], summary: dict) -> list[str]:
    lines = [
        f"# int8 parity across calibration seeds: {tag}",
        "",
        f"Run: {run}. Validation images: {count} (val split). Machine: {info['cpu']}, {info['cpus']} CPUs.",
        f"Training: {training_settings(run)}.",
        "One export per row: the default recipe (calib/default.toml) with the seed changed, edgetl export",
        "defaults otherwise (direct converter, bias correction), no remedies. Targets (issue #3): Δ ≤ 0.5 pp,",
        "agreement ≥ 99 %; gate: Δ ≥ −1.0 pp, agreement ≥ 98 %.",
        "",
        "Activation bias correction: the one the export kept, and each candidate's logit SQNR on held-out",
        "calibration images (layer by layer / output layer only / none; see calib/README.md).",
        "",
        "| equalisation | seed | int8 top-1 | Δtop-1 (pp) | agreement | logit SQNR (dB) | gate "
        "| activation correction (held-out SQNR dB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {'on' if r['equalize'] else 'off'} | {r['seed']} | {100 * r['top1']:.2f}% | "
                     f"{r['delta_top1_pp']:+.2f} | {100 * r['agreement']:.2f}% | {r['sqnr_db']:.1f} | "
                     f"{'pass' if r['passed'] else 'fail'} | {_correction(r['activation_correction'])} |")  # fmt: skip
    for name, s in summary.items():
        lines += [
            "",
            f"Equalisation {name}, {s['exports']} exports: agreement "
            f"{100 * s['agreement_min']:.2f}–{100 * s['agreement_max']:.2f} % (mean "
            f"{100 * s['agreement_mean']:.2f} %, ≥ 99 % in {s['agreement_target_met']}), Δtop-1 "
            f"{s['delta_min']:+.2f} to {s['delta_max']:+.2f} pp (≥ −0.5 in {s['delta_target_met']}), "
            f"SQNR {s['sqnr_min']:.1f}–{s['sqnr_max']:.1f} dB.",
        ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
