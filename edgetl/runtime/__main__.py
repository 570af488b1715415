"""Classify images with a bundle: ``python -m edgetl_runtime BUNDLE IMAGE_OR_FOLDER ...``.

Needs only numpy, OpenCV and LiteRT (or onnxruntime for ONNX bundles). Verifies the bundle's hashes
before loading the model. Exit codes: 0 ok, 1 error, 2 usage, 6 bundle failed verification.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .bundle import BundleError, open_bundle
from .model import open_model
from .preprocess import load_image, prepare

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY = 1, 2, 6


def iter_images(sources: list[str]):
    for source in sources:
        path = Path(source)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            yield path


def softmax(scores):
    import numpy as np

    shifted = np.exp(scores - scores.max())
    return shifted / shifted.sum()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgetl-runtime", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="unpacked bundle folder")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads [the target's]")
    parser.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    args = parser.parse_args(argv)

    try:
        bundle = open_bundle(args.bundle)
    except BundleError as exc:
        print(f"edgetl-runtime: error: {exc}", file=sys.stderr)
        return EXIT_VERIFY if "verification" in str(exc) else EXIT_ERROR
    model = open_model(str(bundle.model_path), args.threads or bundle.threads)
    if model.num_classes != len(bundle.labels):
        print(f"edgetl-runtime: error: model has {model.num_classes} outputs, labels.txt "
              f"{len(bundle.labels)}", file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    done = skipped = 0
    for path in iter_images(args.images):
        try:
            pixels = prepare(load_image(str(path)), bundle.preprocess)
        except ValueError as exc:
            print(f"edgetl-runtime: warning: skipping {path}: {exc}", file=sys.stderr)
            skipped += 1
            continue
        start = time.perf_counter()
        scores = model.predict(pixels)
        latency_ms = (time.perf_counter() - start) * 1000
        probs = softmax(scores)
        top = probs.argsort()[::-1][: args.top_k]
        result = {"source": str(path), "latency_ms": round(latency_ms, 3),
                  "top": [{"label": bundle.labels[i], "index": int(i), "score": round(float(probs[i]), 5)}
                          for i in top]}  # fmt: skip
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            ranked = ", ".join(f"{t['label']} {t['score']:.3f}" for t in result["top"])
            print(f"{path}: {ranked}  ({latency_ms:.1f} ms)", flush=True)
        done += 1
    if done == 0:
        print(f"edgetl-runtime: error: no image could be classified ({skipped} skipped)", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
