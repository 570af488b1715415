"""The goal of `edgetl search` (issue 29), measured: with a latency budget of half the 224-px int8 model's
latency on this host, does the search's best int8 model keep >= 98 % of the 224-px model's top-1, found
in <= 3x the time of one default fine-tune?

The 224-px reference is a default run (``edgetl finetune DATA`` then ``edgetl export``) given with
``--reference RUN``; its fine-tune time with ``--reference-seconds`` (or measured here by running the
default fine-tune again). Its int8 model's latency is measured on this host as the search measures every
model (one LiteRT thread, lowest of three medians of 40 invokes, five times), the budget is half of it,
and the search's time budget is 3x the reference fine-tune time (minus ``--margin`` seconds; the search's
time budget includes its exports). The wall time of the whole ``edgetl search`` command is compared.

    python benchmarks/search_bench.py DATA --reference RUN [--reference-seconds S] --name NAME --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402


def reference_latency(run: Path, repeats: int = 5) -> dict:
    from edgetl.search.latency import host_latency

    figures = [host_latency(run / "model_int8.tflite")["median"] for _ in range(repeats)]
    return {"median_ms": statistics.median(figures), "figures_ms": figures}


def reference_seconds(data: str, out: Path, weights: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgetl", "-q", "finetune", data, "--out", str(out / "reference-timing"),
                    "--weights", weights], check=True)  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--reference", required=True, help="a default 224-px run, exported")
    parser.add_argument("--reference-seconds", type=float, default=None)
    parser.add_argument("--reference-seconds-source", default="measured by this script")
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", required=True, help="the search folder (kept outside the repository)")
    parser.add_argument("--target", default="rpi4-cpu")
    parser.add_argument("--weights", default=os.environ.get("EDGETL_WEIGHTS", "imagenet"))
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--margin", type=float, default=0.0, help="seconds kept off the search's time budget")
    args = parser.parse_args()
    out, reference = Path(args.out), Path(args.reference)
    parity = json.loads((reference / "parity.json").read_text())["artifacts"]["model_int8.tflite"]
    latency = reference_latency(reference)
    seconds = args.reference_seconds or reference_seconds(args.data, out, args.weights)
    budget_ms, minutes = latency["median_ms"] / 2, (3 * seconds - args.margin) / 60
    command = [sys.executable, "-m", "edgetl", "search", args.data, "--out", str(out / "search"), "--target",
               args.target, "--latency-on", "host", "--max-latency-ms", f"{budget_ms:.4f}", "--time-budget",
               f"{minutes:.2f}", "--trials", str(args.trials), "--weights", args.weights, "--json"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out / "search.log").write_text(done.stderr)
    summary = json.loads((out / "search" / "search.json").read_text())
    best = next((r for r in summary["trials"] if summary["best"] and r["number"] == summary["best"]["number"]), None)
    kept = None if best is None else best["int8_top1"] / parity["top1"]
    result = {
        "machine": machine(), "data": args.data, "reference": str(reference), "reference_int8_top1": parity["top1"],
        "reference_latency": latency, "reference_seconds": seconds, "reference_seconds_source":
        args.reference_seconds_source, "budget_ms": budget_ms, "time_budget_min": minutes, "command": command,
        "exit": done.returncode, "wall_s": wall, "wall_vs_reference": wall / seconds, "best": best,
        "kept_fraction": kept, "goal_met": bool(kept is not None and kept >= 0.98 and wall <= 3 * seconds),
        "trials": summary["trials"],
    }  # fmt: skip
    rows = [_row(r) for r in summary["trials"]]
    best_line = ("no trial within budget" if best is None else
                 f"trial {best['number']}: {best['params']['image_size']} px, width {best['params']['width']:g}, "
                 f"{best['params']['strategy']}: int8 {100 * best['int8_top1']:.2f} % "
                 f"({100 * kept:.1f} % of the reference), {best['latency']['ms']:.3f} ms")  # fmt: skip
    markdown = "\n".join([
        f"# edgetl search on {args.name}", "",
        f"Machine: {result['machine']}. Data: `{args.data}`.", "",
        f"- Reference (224 px, default recipe): `{reference}`, int8 top-1 {100 * parity['top1']:.2f} % on the "
        f"validation split; int8 latency on this host (1 thread, lowest of 3 medians of 40, 5 repeats): "
        f"{latency['median_ms']:.3f} ms ({', '.join(f'{x:.3f}' for x in latency['figures_ms'])}); one default "
        f"fine-tune: {seconds:.0f} s ({args.reference_seconds_source}).",
        f"- Budget: {budget_ms:.3f} ms (half); search time budget {minutes:.1f} min (3x the fine-tune"
        f"{f', minus {args.margin:.0f} s' if args.margin else ''}).",
        f"- Search: exit {done.returncode}, wall {wall:.0f} s = {wall / seconds:.2f}x one default fine-tune; "
        f"best {best_line}.",
        f"- Goal (>= 98 % of the reference's top-1 in <= 3x its time): "
        f"**{'met' if result['goal_met'] else 'NOT met'}**.",
        "", "| # | size | width | strategy | lr | label smoothing | val top-1 (float) | int8 top-1 | latency (ms) | "
        "epochs | status | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"Command: `{' '.join(command[1:])}`",
    ])  # fmt: skip
    write_result(f"search_bench_{args.name}", result, markdown + "\n")


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f} %"


def _row(r: dict) -> str:
    p, lat = r.get("params") or {}, r.get("latency") or {}
    ms = f"{lat['ms']:.3f}" if lat else ""
    return (f"| {r['number']} | {p.get('image_size', '')} | {p.get('width', '')} | {p.get('strategy', '')} | "
            f"{p.get('lr', 0):.2g} | {p.get('label_smoothing', 0):.2f} | {_pct(r.get('val_top1'))} | "
            f"{_pct(r.get('int8_top1'))} | {ms} | {r.get('epochs', '')} | {r['status']} | {r.get('seconds', '')} |")


if __name__ == "__main__":
    main()
