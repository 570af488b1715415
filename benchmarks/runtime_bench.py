"""Device-runtime latency of a bundle and of the Coral reference model, and host/device agreement.

In one process: ``edgetl.runtime.app.bench`` (invoke and whole frame — preprocess a 640x480 frame,
invoke, postprocess — median and p90) at each thread count for the bundle's model and for the
third-party Coral int8 MobileNetV2; then the bundle's predictions through the device path (OpenCV
decode, shared preprocessing, LiteRT) against the host's parity path (Pillow decode, same
preprocessing, LiteRT) on the run's validation split. Writes ``results/runtime_bench_<tag>.{json,md}``.

    python benchmarks/runtime_bench.py BUNDLE_DIR [--threads 1,2] [--runs 50]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, machine, write_result  # noqa: E402

CORAL = SHARED / "models" / "coral_mobilenet_v2"


def bench(model: str, threads: str, runs: int, labels: str | None = None) -> dict:
    from edgetl.runtime import app

    argv = ["bench", model, "--threads", threads, "--runs", str(runs), "--json"]
    if labels:
        argv += ["--labels", labels]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        app.main(argv)
    return json.loads(out.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument(
        "--tag", default=None, help="result name [sign_language_<the bundle's target>_on_<this machine's arch>]"
    )
    parser.add_argument("--run", default=None, help="the run the bundle came from [BUNDLE/../..]")
    args = parser.parse_args()
    if args.tag is None:  # the bundle names the target it was built for; the numbers are this machine's
        manifest = Path(args.bundle) / "manifest.json"
        target = json.loads(manifest.read_text())["target"]["name"] if manifest.is_file() else "model"
        args.tag = f"sign_language_{target.replace('-', '_')}_on_{platform.machine()}"

    import numpy as np

    from edgetl.data.cache import load_split
    from edgetl.data.folders import discover
    from edgetl.runtime.classifier import load_classifier
    from edgetl.runtime.model import TFLiteClassifier
    from edgetl.runtime.preprocess import load_image

    results = {"bundle": bench(args.bundle, args.threads, args.runs)}
    if CORAL.is_dir():
        results["coral"] = bench(str(CORAL / "mobilenet_v2_1.0_224_quant.tflite"), args.threads, args.runs,
                                 str(CORAL / "imagenet_labels.txt"))  # fmt: skip

    # Host path (Pillow decode, as edgetl check) vs device path (OpenCV decode, as the runtime) on the
    # validation split of the run the bundle was packaged from (default: RUN/bundles/BUNDLE).
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    run_dir = Path(args.run) if args.run else Path(args.bundle).resolve().parents[1]
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["finetune"]
    device = load_classifier(args.bundle, 1, None, False, 1.0, "0,255")
    host = TFLiteClassifier(str(Path(args.bundle) / manifest["model"]))
    splits = discover(stage["data"]["root"], stage["config"]["val_fraction"], stage["config"]["seed"])
    val = load_split(splits.val, device.spec.resize_size, device.spec, eval_crop=True)
    host_top = np.array([host.predict(img).argmax() for img in val.images])
    device_top = np.array([device.classify(load_image(p), 1)[0][0]["index"] for p in val.paths])
    agreement = {"images": int(len(val.paths)), "top1_agreement": float((host_top == device_top).mean()),
                 "device_top1": float((device_top == val.labels).mean()),
                 "host_top1": float((host_top == val.labels).mean())}  # fmt: skip

    info = machine()
    lines = [f"# Device runtime benchmark ({info['cpu']}, {info['cpus']} CPUs)", "",
             f"Frame: 640x480 RGB, {args.runs} timed runs after 5 warm-ups per row, one process.", "",
             "| model | threads | invoke median ms | p90 | frame median ms | p90 | pre+post / invoke |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, result in results.items():
        for r in result["results"]:
            overhead = 100 * r["overhead_fraction"]
            lines.append(f"| {name} | {r['threads']} | {r['invoke_ms_median']:.2f} | {r['invoke_ms_p90']:.2f} | "
                         f"{r['frame_ms_median']:.2f} | {r['frame_ms_p90']:.2f} | {overhead:.1f}% |")  # fmt: skip
    lines += ["", f"Host (Pillow) vs device (OpenCV) path on {agreement['images']} validation images: "
                  f"top-1 agreement {100 * agreement['top1_agreement']:.2f}%, device top-1 "
                  f"{100 * agreement['device_top1']:.2f}%, "
                  f"host top-1 {100 * agreement['host_top1']:.2f}%."]  # fmt: skip
    payload = {"machine": info, "latency": results, "agreement": agreement}
    write_result(f"runtime_bench_{args.tag}", payload, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
