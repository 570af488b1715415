"""``edgetl_runtime bench BUNDLE [MORE ...]``: invoke and whole-frame latency per thread count on this device.

Every (model, thread count) is timed interleaved (:func:`edgetl.runtime.bench.interleaved_latency`), so
the thread counts and models compare under the same conditions even while something else runs; the
output says when the device was busy or the timings scattered, instead of printing a clean table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .bench import HostLoad, interleaved_latency, timing_warning
from .classifier import EXIT_OK, Classifier, RuntimeFailure, load_classifier, thread_count
from .scores import device_facts
from .sources import image_frames

WARMUP = 5


def bench(args: argparse.Namespace) -> int:
    """Median and p90 of invoke and of the whole frame (preprocess + invoke + postprocess)."""
    threads = [thread_count(t, "--threads") for t in args.threads.split(",")] if args.threads else [1, 2, 4]
    models = [args.model, *args.sources]
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)  # a VGA camera frame
    classifiers = {(model, count): load_classifier(model, count, args.labels, False, args.crop_fraction,
                                                   args.pixel_range)
                   for model in models for count in threads}  # fmt: skip
    invoke: dict[tuple[str, int], list[float]] = {key: [] for key in classifiers}

    def call(key: tuple[str, int]) -> None:
        _, timings = classifiers[key].classify(frame, 5)
        invoke[key].append(timings["invoke_ms"])

    with HostLoad() as load:
        timed = interleaved_latency({key: (lambda key=key: call(key)) for key in classifiers}, args.runs, WARMUP)
    rows = []
    for (model, count), whole in timed.items():
        invoked = np.asarray(invoke[(model, count)][WARMUP:])
        rows.append({
            **({"model": model} if len(models) > 1 else {}), "threads": count,
            "invoke_ms_median": float(np.median(invoked)), "invoke_ms_p90": float(np.percentile(invoked, 90)),
            "frame_ms_median": whole["median_ms"], "frame_ms_p90": whole["p90_ms"],
            "overhead_fraction": float((whole["median_ms"] - np.median(invoked)) / np.median(invoked)),
        })  # fmt: skip
    warning = timing_warning(load, {f"{m}, {c} thread(s)": s for (m, c), s in timed.items()})
    result = {"model": args.model, "runs": args.runs, "frame": "640x480 RGB", "interleaved": True, "results": rows,
              "host_load": load.to_dict(), "warning": warning, "device": device_facts()}  # fmt: skip
    if len(models) > 1:
        result["models"] = models
    if args.data:
        result["accuracy"] = labelled_accuracy(classifiers[(models[0], threads[0])], args.data)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result, rows, args.data)
    return EXIT_OK


def _print_table(result: dict[str, Any], rows: list[dict[str, Any]], data: str | None) -> None:
    if data:
        acc = result["accuracy"]
        print(f"top-1 {100 * acc['top1']:.2f} % on {acc['images']} images of {data} ({acc['skipped']} unreadable)")
    several = "model" in rows[0]
    print(("model  " if several else "") + f"{'threads':>7} {'invoke median':>14} {'p90':>8} {'frame median':>13} "
          f"{'p90':>8} {'pre+post':>9}")  # fmt: skip
    for r in rows:
        overhead = 100 * r["overhead_fraction"]
        print((f"{r['model']}  " if several else "") + f"{r['threads']:>7} {r['invoke_ms_median']:>11.2f} ms "
              f"{r['invoke_ms_p90']:>5.2f} ms {r['frame_ms_median']:>10.2f} ms {r['frame_ms_p90']:>5.2f} ms "
              f"{overhead:>8.1f}%")  # fmt: skip


def labelled_accuracy(classifier: Classifier, root: str) -> dict[str, Any]:
    """Top-1 of the device pipeline on a labelled folder ``ROOT/<label>/<images>`` (the labels by name)."""
    folder = Path(root)
    if not folder.is_dir():
        raise RuntimeFailure(f"--data {root} is not a folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    unknown = [c for c in classes if c not in classifier.labels]
    if not classes or unknown:
        raise RuntimeFailure(f"--data {root}: " + (f"folders that are not labels of the model: {', '.join(unknown)}"
                                                   if unknown else "no class folders"))  # fmt: skip
    right = total = skipped = 0
    for name in classes:
        for frame in image_frames([str(folder / name)]):
            if frame.rgb is None:
                skipped += 1
                continue
            top, _ = classifier.classify(frame.rgb, 1)
            right += top[0]["label"] == name
            total += 1
    if total == 0:
        raise RuntimeFailure(f"--data {root}: no readable images")
    return {"data": str(root), "images": total, "top1": right / total, "skipped": skipped}
