"""Export cost, model sizes, int8 parity and LiteRT latency for the full MobileNetV2 (width 1.0, 224).

Takes a finished fine-tuning run -- the sign-language run with edgetl's defaults::

    edgetl finetune ../shared/data/sign_language_digits/Dataset --out /work/runs/sl_default \
        --weights ../shared/weights/mobilenet_v2_imagenet_features.pth

-- exports a copy of it with the default calibration
recipe while timing every step (ONNX, float32 TFLite, int8, parity on the validation split), then
measures single-image invoke latency of the float32 and int8 models and of the third-party Coral
int8 MobileNetV2 at 1 and 2 threads, all in one process. Writes ``results/export_bench_<tag>.{json,md}``.

    python benchmarks/export_bench.py [--run DIR] [--runs 50] [--converter direct|onnx2tf]
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
from _common import SHARED, finished_run, machine, write_result  # noqa: E402

CORAL = SHARED / "models" / "coral_mobilenet_v2" / "mobilenet_v2_1.0_224_quant.tflite"


PARITY_KEYS = ("top1", "delta_top1_pp", "agreement", "cosine_mean", "sqnr_db", "passed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/work/runs/sl_default")
    parser.add_argument("--runs", type=int, default=50, help="timed invokes per model and thread count")
    parser.add_argument("--tag", default="sign_language_cpu")
    parser.add_argument("--keep", default=None, help="keep the exported copy of the run in this folder")
    parser.add_argument("--converter", choices=["direct", "onnx2tf"], default="direct")
    args = parser.parse_args()
    run = finished_run(args.run)
    if run is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    skip = shutil.ignore_patterns("checkpoints", ".export-work", "bundles", "model*.tflite", "model.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp) / "run"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(run, work, ignore=skip)
        m = _export(work, args.converter)
        m["latency"] = _latency(work, args.runs)
        # Ablation, after the timings: the same export without range equalisation (edgetl.quantize.equalize).
        plain = Path(tmp) / "no-equalize"
        shutil.copytree(run, plain, ignore=skip)
        m["ablation"] = _ablation(plain, args.converter)
    info = machine()
    m["ratios"] = _ratios(m["latency"])
    lines = _steps_table(run, info, args, m) + _artifacts_table(m) + _latency_lines(m) + _remedy_lines(m["remedies"])
    lines += _equalization_lines(m)
    payload = {"machine": info, "run": str(run), "converter": args.converter, "timings": m["timings"],
               "wall_s": m["wall"], "sizes": m["sizes"], "size_breakdown": m["breakdown"],
               "parity": m["parity"], "parity_images": m["count"], "latency": m["latency"], "ratios": m["ratios"],
               "remedies": m["remedies"], "bias_correction": m["correction"], "equalization": m["equalization"],
               "relu_equalization": m["relu_equalization"], "int8_without_equalization": m["ablation"]}  # fmt: skip
    write_result(f"export_bench_{args.tag}", payload, "\n".join(lines) + "\n")
    return 0


def _export(work: Path, converter: str) -> dict:
    """One timed export of ``work`` with the defaults: what it wrote, its parity and its records."""
    from edgetl.config import ExportConfig
    from edgetl.pipeline import export_and_check
    from edgetl.quantize.tflite_facts import size_breakdown
    from edgetl.rundir import read_manifest

    t0 = time.perf_counter()
    result = export_and_check(work, ExportConfig(converter=converter))
    wall = time.perf_counter() - t0
    stage = read_manifest(work)["stages"]["export"]
    return {
        "wall": wall, "timings": result.timings, "remedies": result.remedies,
        "correction": stage.get("bias_correction"), "equalization": stage.get("equalization"),
        "relu_equalization": stage.get("relu_equalization"),
        "sizes": {name: a["bytes"] for name, a in result.artifacts.items()},
        "breakdown": {name: size_breakdown(str(work / name)) for name in ("model_float32.tflite", "model_int8.tflite")},
        "parity": {n: {k: a[k] for k in PARITY_KEYS} for n, a in result.parity.artifacts.items()},
        "count": result.parity.data["count"],
    }  # fmt: skip


def _latency(work: Path, runs: int) -> dict:
    import numpy as np

    from edgetl.runtime.bench import invoke_latency
    from edgetl.runtime.model import TFLiteClassifier

    rng = np.random.default_rng(0)
    latency = {}
    models = {"float32": work / "model_float32.tflite", "int8": work / "model_int8.tflite"}
    if CORAL.is_file():
        models["coral int8 (third-party)"] = CORAL
    for name, path in models.items():
        for threads in (1, 2):
            model = TFLiteClassifier(str(path), num_threads=threads)
            height, width = model.image_size
            tensor = model.to_input(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            latency[f"{name}@{threads}"] = invoke_latency(model, tensor, runs=runs)
    return latency


def _ablation(plain: Path, converter: str) -> dict:
    from edgetl.config import ExportConfig
    from edgetl.pipeline import export_and_check

    unequalised = export_and_check(plain, ExportConfig(converter=converter, equalize=False, remedies=False))
    return {k: unequalised.parity.artifacts["model_int8.tflite"][k] for k in PARITY_KEYS}


def _ratios(latency: dict) -> dict:
    ratio = {f"int8/float32 @{n}": latency[f"int8@{n}"]["median_ms"] / latency[f"float32@{n}"]["median_ms"]
             for n in (1, 2)}  # fmt: skip
    if CORAL.is_file():
        for n in (1, 2):
            ratio[f"ours int8/coral int8 @{n}"] = (
                latency[f"int8@{n}"]["median_ms"] / latency[f"coral int8 (third-party)@{n}"]["median_ms"]
            )
    return ratio


def _steps_table(run: Path, info: dict, args: argparse.Namespace, m: dict) -> list[str]:
    t, count = m["timings"], m["count"]
    return [
        "# Export benchmark: MobileNetV2 width 1.0, 224x224",
        "",
        f"Run: {run} (sign-language digits). Machine: {info['cpu']}, {info['cpus']} CPUs.",
        f"One export; latency = invoke only, median of {args.runs} runs after 5 warm-ups, one image.",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| ONNX export + onnx.checker | {t.get('onnx_s', 0):.1f} |",
        f"| converter process ({args.converter}; starting Python + TensorFlow included) | "
        f"{t.get('converter_process_s', 0):.1f} |",
        f"| - float32 TFLite ({'onnx2tf' if 'onnx2tf_s' in t else 'TFLiteConverter'}) | "
        f"{t.get('onnx2tf_s', t.get('tflite_float_s', 0)):.1f} |",
        "| - int8 calibration (split over two processes on 2+ cores, edgetl.quantize.calibrate) + quantisation | "
        f"{t.get('int8_s', 0):.1f} |",
        f"| - int8 bias correction | {t.get('int8_bias_correction_s', 0):.1f} |",
        f"| parity on {count} validation images ({len(m['parity'])} models; the PyTorch reference is computed "
        f"before conversion, for the float checks too) | {t.get('parity_s', 0):.1f} |",
        f"| **export without remedies** (ONNX + float TFLite + int8 + checks + parity) | "
        f"**{t['total_s'] - t.get('remedies_s', 0):.1f}** |",
        f"| int8 diagnosis and remedies (only when int8 fails) | {t.get('remedies_s', 0):.1f} |",
        f"| whole `export` call | {m['wall']:.1f} |",
        "",
    ]


def _artifacts_table(m: dict) -> list[str]:
    sizes, parity = m["sizes"], m["parity"]
    lines = ["| artifact | bytes | top-1 | Δtop-1 (pp) | agreement | logit SQNR (dB) | passed |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    rows = [(name, f"{size:,}", parity.get(name, {})) for name, size in sizes.items()]
    rows.append(("model_int8.tflite, `--no-equalize` (ablation)", "", m["ablation"]))
    for name, size, p in rows:
        lines.append(f"| {name} | {size} | {100 * p.get('top1', 0):.2f}% | {p.get('delta_top1_pp', 0):+.2f} | "
                     f"{100 * p.get('agreement', 0):.2f}% | {p.get('sqnr_db', 0):.1f} | "
                     f"{p.get('passed')} |")  # fmt: skip
    int8, float32 = m["breakdown"]["model_int8.tflite"], m["breakdown"]["model_float32.tflite"]
    lines += ["", f"int8 / float32 size: {sizes['model_int8.tflite'] / sizes['model_float32.tflite']:.3f}", "",
              "Where the bytes go (edgetl.quantize.tflite_facts.size_breakdown, each stored vector counted once;",
              "quantisation parameters: a float32 scale per output channel for per-channel weights and again for",
              "their int32 biases; the int64 zero points, all 0, are stored once per length by",
              "edgetl.export.tflite_dedup):", "",
              "| part | float32 | int8 |", "|---|---|---|",
              *[f"| {k} | {float32[k]:,} | {int8[k]:,} |" for k in int8],
              "", f"int8 / float32 without the per-channel quantisation parameters: "
              f"{(int8['file'] - int8['quantization_parameters']) / float32['file']:.3f}", ""]  # fmt: skip
    return lines


def _latency_lines(m: dict) -> list[str]:
    lines = ["| model @ threads | median ms | p90 ms |", "|---|---|---|"]
    lines += [f"| {k} | {v['median_ms']:.2f} | {v['p90_ms']:.2f} |" for k, v in m["latency"].items()]
    return lines + ["", *[f"- {k}: {v:.3f}" for k, v in m["ratios"].items()]]


def _remedy_lines(remedies: list[dict]) -> list[str]:
    if not remedies:
        return []
    lines = ["", "int8 failed parity; diagnosis and remedies (each re-checked on the same images):"]
    for r in remedies:
        if r["remedy"] == "diagnosis":
            worst = ", ".join(f"{w['layer']} ({w['op']}) {w['rmse_over_scale']:.2f}"
                              for w in r.get("worst_layers", []))  # fmt: skip
            lines.append(f"- diagnosis (RMSE/scale of the worst layers): {worst or r.get('error')}")
        else:
            result_text = r.get("error") or (f"top-1 {100 * r['top1']:.2f}%, Δ {r['delta_top1_pp']:+.2f} pp, "
                                             f"agreement {100 * r['agreement']:.2f}%")  # fmt: skip
            lines.append(f"- {r['remedy']}: {result_text} — {'pass' if r.get('passed') else 'fail'}")
    return lines


def _equalization_lines(m: dict) -> list[str]:
    relu_equalization = m["relu_equalization"]
    streams = ", ".join(f"{e['tensor']} (scale <= {e['scale_max']:.2f}, shift <= {e['shift_max']:.2f})"
                        for e in m["equalization"] or [])  # fmt: skip
    relus = (f"{len(relu_equalization)} tensors, scale <= {max(e['scale_max'] for e in relu_equalization):.1f}, "
             f"{sum(e['dead_channels'] for e in relu_equalization)} never-positive channels left alone"
             if relu_equalization else "none")  # fmt: skip
    return ["", f"int8 bias correction: {m['correction']}", "",
            f"Range equalisation of the int8 model's graph (edgetl.quantize.equalize): linear streams "
            f"{streams or 'none'}; ReLU6 outputs before depthwise convolutions: {relus}."]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
