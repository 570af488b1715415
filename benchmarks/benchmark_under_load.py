"""`edgetl benchmark` beside a CPU burner: does the int8/float speed-up hold? (issue #30)

Runs :func:`edgetl.check.benchmark.benchmark` (what ``edgetl benchmark RUN --threads 1`` runs) on a run,
``--repeats`` times in each condition, in turn: quiet; beside one busy-looping process per core ("steady");
beside the same processes busy one second, idle the next ("bursty", the load of a fine-tune's epochs and
evaluations). For comparison, the same models timed the way ``benchmark`` did before: one model's runs after
the other's (``sequential``). Writes ``results/benchmark_under_load_<tag>.{json,md}``.

    python benchmarks/benchmark_under_load.py RUN_DIR [--runs 50] [--repeats 3] [--tag sign_language]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine, write_result  # noqa: E402

BURNERS = {
    "steady": "while True: pass",
    "bursty": "import time\nwhile True:\n    end = time.monotonic() + 1\n    while time.monotonic() < end: pass\n"
              "    time.sleep(1)",
}


def sequential_ratio(run_dir: Path, runs: int) -> float:
    """int8 / float32 TFLite as benchmark timed them before: all of one model's runs, then the other's."""
    import numpy as np

    from edgetl.runtime.bench import call_latency
    from edgetl.runtime.model import open_model

    sample = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    medians = {}
    for name in ("model_float32.tflite", "model_int8.tflite"):
        model = open_model(str(run_dir / name), 1)
        tensor = model.to_input(sample[0])
        medians[name] = call_latency(lambda model=model, tensor=tensor: model.invoke(tensor), runs, 5)["median_ms"]
    return medians["model_float32.tflite"] / medians["model_int8.tflite"]


def measure(run_dir: Path, runs: int) -> dict:
    from edgetl.check.benchmark import benchmark

    report = benchmark(run_dir, [1], runs=runs)
    rows = {row["artifact"]: row for row in report.rows}
    return {"speedup": rows["model_int8.tflite"]["speedup"]["1"],
            "int8_ms": rows["model_int8.tflite"]["latency_ms"]["1"]["median"],
            "float_ms": rows["model_float32.tflite"]["latency_ms"]["1"]["median"],
            "host_load": report.data["host_load"], "warning": report.data["warning"],
            "sequential_speedup": sequential_ratio(run_dir, runs)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="sign_language")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    rows = []
    for repeat in range(args.repeats):
        for condition in ("quiet", "steady", "bursty"):
            burners = [] if condition == "quiet" else [
                subprocess.Popen([sys.executable, "-c", BURNERS[condition]]) for _ in range(os.cpu_count() or 1)]
            try:
                time.sleep(0.5 if burners else 0)
                rows.append({"condition": condition, "repeat": repeat, **measure(run_dir, args.runs)})
            finally:
                for burner in burners:
                    burner.kill()
                    burner.wait()
            print(rows[-1], flush=True)
    quiet = [r["speedup"] for r in rows if r["condition"] == "quiet"]
    reference = sorted(quiet)[len(quiet) // 2]
    lines = [f"# `edgetl benchmark` beside a CPU burner ({args.tag})", "",
             f"Run `{run_dir.name}`, 1 thread, {args.runs} timed runs per model; {os.cpu_count()} burner processes "
             "(one per core) in the loaded conditions. Speed-up = int8 / float32 TFLite (median of per-round ratios); "
             f"the quiet median speed-up {reference:.3f}× is the reference.", "",
             "| condition | repeat | float32 ms | int8 ms | speed-up (interleaved) | vs quiet | speed-up (sequential, "
             "the old way) | other processes, cores | said busy |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['condition']} | {r['repeat']} | {r['float_ms']:.2f} | {r['int8_ms']:.2f} | "
                     f"{r['speedup']:.3f}× | {100 * (r['speedup'] / reference - 1):+.1f} % | "
                     f"{r['sequential_speedup']:.3f}× | {r['host_load']['other_cores']:.2f} | "
                     f"{'yes' if r['warning'] else 'no'} |")  # fmt: skip
    write_result(f"benchmark_under_load_{args.tag}", {"machine": machine(), "run": str(run_dir), "runs": args.runs,
                                                      "reference_speedup": reference, "rows": rows},
                 "\n".join(lines) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
