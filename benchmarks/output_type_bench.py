"""What the uint8 output and the TFLite metadata cost: the int8 model exported twice from one run.

``edgetl.export.tool_metadata`` ends the int8 model with a QUANTIZE op (int8 -> uint8) and packs
metadata and labels into the file, so that MediaPipe and other tools load it. This exports a
fine-tuned run twice into temporary copies, once as the default (uint8 output) and once as a target
with ``output_dtype = "int8"`` would (no final op), then compares top-1 and agreement with float on the
validation split (from each export's parity check), file size, and invoke latency: the two models
alternate call by call (``--runs`` calls each per thread count, after 20 warm-up calls) so that drift of
a shared machine hits both alike. Writes ``results/output_type_<tag>.{json,md}``.

    python benchmarks/output_type_bench.py RUN [--threads 1 2] [--runs 300] [--tag sign_language]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402


def export_copy(run: Path, folder: Path, output: str) -> Path:
    from edgetl.config import ExportConfig
    from edgetl.pipeline import export_and_check

    copy = folder / f"run-{output}"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "bundles", "report.html"))
    export_and_check(copy, ExportConfig(int8_output=output))
    return copy


def alternating_latency(paths: list[Path], threads: int, runs: int) -> list[dict[str, float]]:
    from edgetl.runtime.model import open_model

    models = [open_model(str(p), threads) for p in paths]
    image = np.random.default_rng(0).integers(0, 256, (*models[0].image_size, 3), dtype=np.uint8)
    tensors = [m.to_input(image) for m in models]
    samples: list[list[float]] = [[] for _ in models]
    for step in range(20 + runs):
        for index, (model, tensor) in enumerate(zip(models, tensors, strict=True)):
            start = time.perf_counter()
            model.invoke(tensor)
            if step >= 20:
                samples[index].append((time.perf_counter() - start) * 1e3)
    return [{"median_ms": float(np.median(s)), "p90_ms": float(np.percentile(s, 90))} for s in samples]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--tag", default="sign_language")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        copies = {output: export_copy(args.run, Path(tmp), output) for output in ("uint8", "int8")}
        paths = [copies[o] / "model_int8.tflite" for o in ("uint8", "int8")]
        latency = {t: alternating_latency(paths, t, args.runs) for t in args.threads}
        for index, output in enumerate(("uint8", "int8")):
            parity = json.loads((copies[output] / "parity.json").read_text())["artifacts"]["model_int8.tflite"]
            rows[output] = {"bytes": paths[index].stat().st_size, "top1": parity["top1"],
                            "agreement": parity["agreement"], "count": parity["count"],
                            "latency": {str(t): latency[t][index] for t in args.threads}}  # fmt: skip
    info = machine()
    lines = [f"# int8 model: uint8 output + metadata (default) vs int8 output, run {args.run.name}", "",
             f"Machine: {info['cpu']}, {info['cpus']} CPUs. Validation split ({rows['uint8']['count']} images); "
             f"invoke latency, {args.runs} alternating calls per model and thread count.", "",
             "| int8 model output | size | top-1 | agreement with float | "
             + " | ".join(f"{t} thread(s) median / p90 ms" for t in args.threads) + " |",
             "|---|---|---|---|" + "---|" * len(args.threads)]  # fmt: skip
    for output, row in rows.items():
        cells = [f"{row['latency'][str(t)]['median_ms']:.3f} / {row['latency'][str(t)]['p90_ms']:.3f}"
                 for t in args.threads]  # fmt: skip
        lines.append(f"| {output} | {row['bytes']:,} B | {100 * row['top1']:.2f} % | {100 * row['agreement']:.2f} % | "
                     + " | ".join(cells) + " |")  # fmt: skip
    write_result(f"output_type_{args.tag}", {"machine": info, "run": str(args.run), "rows": rows},
                 "\n".join(lines) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
