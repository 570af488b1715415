"""JPEG decode speed per core, before and after decoding at reduced scale in the codec, and what it changes.

For generated photo-like JPEGs of 500x375 and 4000x3000 (``gpu_throughput._jpeg``: the same kind of
picture drawn at full resolution, quality 90), one thread, per model input size:

- before: ``decode_image(path)`` (full size), then the training crop (shorter side area-resized to the
  model's resize size, centre crop) and the pixel digest, as edgetl did;
- after: ``edgetl.data.decode.decode_sample`` (Pillow ``draft`` for a JPEG at least four times the resize
  size: DCT scaling by the largest of 1/2, 1/4, 1/8 that keeps both sides >= 2x the resize size), the
  same crop and digest;
- resize noise, for scale: |Pillow's antialiased bilinear - OpenCV's area| resize of the same full decode
  (two standard resizers of one image);
- difference: mean, 99th percentile and max of |after - before| of the model's input crop (``prepare``).

Writes ``benchmarks/results/decode_speed.{json,md}``.

    python benchmarks/decode_speed.py --work /tmp/decode-bench [--small 200] [--large 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine, write_result  # noqa: E402


def large_jpeg(job: tuple[str, int]) -> None:
    """A 4000x3000 photo-like JPEG: ``gpu_throughput._jpeg``'s picture drawn at full resolution."""
    from gpu_throughput import _jpeg

    _jpeg((*job, 4000, 3000))


def images(work: Path, name: str, count: int, make) -> list[Path]:
    from multiprocessing import Pool

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:04d}.jpg" for i in range(count)]
    missing = [(str(p), i) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        with Pool(os.cpu_count() or 1) as pool:
            pool.map(make, missing)
    return paths


def per_second(fn, paths: list[Path], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for path in paths:
            fn(path)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def measure(paths: list[Path], image_size: int, repeat: int) -> dict:
    from edgetl.data.decode import decode_image, decode_sample, pixel_digest
    from edgetl.runtime.preprocess import PreprocessSpec, center_crop, prepare, resize_shorter

    spec = PreprocessSpec.for_size(image_size)

    def before(path: Path) -> None:
        image = decode_image(path)
        center_crop(resize_shorter(image, spec.resize_size, spec.interpolation), spec.resize_size)
        pixel_digest(image)

    def after(path: Path) -> None:
        decode_sample(path, spec.resize_size, spec, eval_crop=False)

    diffs, noise = [], []
    for path in paths[:20]:
        full = decode_image(path)
        reference = prepare(full, spec).astype(np.int16)
        diffs.append(np.abs(prepare(decode_image(path, spec.resize_size), spec) - reference).ravel())
        noise.append(np.abs(_pillow_input(full, spec) - reference).ravel())
    diffs, noise = np.concatenate(diffs), np.concatenate(noise)
    full = decode_image(paths[0]).shape
    reduced = decode_image(paths[0], spec.resize_size).shape
    return {"image_size": image_size, "resize_size": spec.resize_size,
            "before_per_s": per_second(before, paths, repeat), "after_per_s": per_second(after, paths, repeat),
            "decoded_shape": [full[:2], reduced[:2]], "diff_mean": float(diffs.mean()),
            "diff_p99": float(np.percentile(diffs, 99)), "diff_max": int(diffs.max()),
            "noise_mean": float(noise.mean()), "noise_p99": float(np.percentile(noise, 99))}  # fmt: skip


def _pillow_input(image: np.ndarray, spec) -> np.ndarray:
    """The model input made with Pillow's antialiased bilinear resize instead of OpenCV's area resize."""
    from PIL import Image

    from edgetl.runtime.preprocess import center_crop

    h, w = image.shape[:2]
    scale = spec.resize_size / min(h, w)
    size = (max(spec.resize_size, round(w * scale)), max(spec.resize_size, round(h * scale)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    return center_crop(resized, spec.image_size).astype(np.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--small", type=int, default=200, help="500x375 JPEGs.")
    parser.add_argument("--large", type=int, default=20, help="4000x3000 JPEGs.")
    parser.add_argument("--repeat", type=int, default=3, help="Timed passes; the fastest counts.")
    parser.add_argument("--margin", type=int, default=None,
                        help="Decode at reduced scale down to this x the resize size [edgetl's DRAFT_MARGIN, 2]")
    args = parser.parse_args()
    from edgetl.data import decode

    if args.margin is not None:
        decode.DRAFT_MARGIN = args.margin
    args.margin = decode.DRAFT_MARGIN
    from gpu_throughput import _jpeg

    sets = {"500x375": images(args.work, "small", args.small, _jpeg),
            "4000x3000": images(args.work, "large_4000", args.large, large_jpeg)}  # fmt: skip
    rows = [{"images": name, "count": len(paths), **measure(paths, size, args.repeat)}
            for name, paths in sets.items() for size in (128, 224)]  # fmt: skip
    result = {"machine": machine(), "rows": rows}
    result["margin"] = args.margin
    name = "decode_speed" if args.margin == 2 else f"decode_speed_margin{args.margin}"
    write_result(name, result, markdown(result, args))


def markdown(result: dict, args: argparse.Namespace) -> str:
    lines = [
        "# JPEG decode per core: full size vs reduced in the codec (Pillow draft)",
        "",
        f"Command: `python benchmarks/decode_speed.py --work DIR --small {args.small} --large {args.large} "
        f"--repeat {args.repeat}" + (f" --margin {args.margin}`" if args.margin != 2 else "`"),
        f"Reduced-scale decode keeps both sides >= {args.margin}x the resize size.",
        f"Machine: {result['machine']['cpu']}, one thread; images/s of decode + training crop + pixel digest, "
        f"the fastest of {args.repeat} passes. Difference: |reduced - full| of the model's input crop (`prepare`), "
        "in 0..255 levels, over the first 20 images; resize noise: |Pillow antialiased bilinear - OpenCV area| of the "
        "same full decode.",
        "",
        "| JPEGs | model input | decoded at | before img/s | after img/s | speed-up | mean diff | p99 diff "
        "| max diff | resize noise mean / p99 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        full, reduced = row["decoded_shape"]
        lines.append(
            f"| {row['images']} ({row['count']}) | {row['image_size']} (resize {row['resize_size']}) "
            f"| {reduced[1]}x{reduced[0]} of {full[1]}x{full[0]} | {row['before_per_s']:.1f} "
            f"| {row['after_per_s']:.1f} "
            f"| {row['after_per_s'] / row['before_per_s']:.2f}x | {row['diff_mean']:.2f} | {row['diff_p99']:.0f} "
            f"| {row['diff_max']} | {row['noise_mean']:.2f} / {row['noise_p99']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
