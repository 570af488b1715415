"""Raw scores of a bundle on a list of images, for parity measured where the bundle runs.

    python3 -m edgetl_runtime scores BUNDLE --list images.txt [--inputs crops.npy] [--cpu]

``edgetl check --on-target`` runs this under an emulated board (qemu-user) or on a real one (ssh):
the bundle's own decoding and preprocessing, its own interpreter and wheels. One JSON line per image
on stdout (``{"i", "scores", "invoke_ms"}``, plus ``"host_input_scores"`` and the pixel difference when
the host's input crops are given and differ from this device's), then one ``{"device": ...}`` line
saying where it ran (machine, board model, Python and library versions).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import open_bundle
from .model import open_model
from .preprocess import prepare
from .sources import image_frames

LIBRARIES = ("numpy", "ai-edge-litert", "opencv-python-headless", "opencv-python", "tflite-runtime")


def board_model() -> str:
    """The board's own name (``/proc/device-tree/model`` on a Pi), else the CPU's from /proc/cpuinfo."""
    try:
        return Path("/proc/device-tree/model").read_bytes().rstrip(b"\0").decode(errors="replace")
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("model name", "hardware", "cpu model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_facts() -> dict[str, Any]:
    """Where this process runs: machine, board, Python and the versions of the runtime's libraries."""
    from importlib import metadata

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"machine": platform.machine(), "board": board_model(), "python": platform.python_version(),
            "libc": "-".join(platform.libc_ver()), "versions": versions}  # fmt: skip


def scores(args: argparse.Namespace) -> int:
    """Print each listed image's scores (the device's own decode, preprocessing and interpreter)."""
    bundle = open_bundle(args.model)
    model_path = bundle.root / bundle.manifest["model"] if args.cpu else bundle.model_path
    model = open_model(str(model_path), int(args.threads or 1), delegate=None if args.cpu else bundle.delegate)
    paths = [line for line in Path(args.list).read_text(encoding="utf-8").splitlines() if line]
    host_inputs = np.load(args.inputs, mmap_mode="r") if args.inputs else None
    if host_inputs is not None and len(host_inputs) != len(paths):
        raise ValueError(f"--inputs has {len(host_inputs)} images, --list {len(paths)}")
    start = int(args.first or 0)
    for offset, frame in enumerate(image_frames(paths[start:: max(int(args.step or 1), 1)])):
        index = start + offset * max(int(args.step or 1), 1)
        record: dict[str, Any] = {"i": index}
        if frame.rgb is None:
            record["error"] = frame.error
        else:
            pixels = prepare(frame.rgb, bundle.preprocess)
            t0 = time.perf_counter()
            record["scores"] = model.predict(pixels).tolist()
            record["invoke_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
            if host_inputs is not None:
                host = np.asarray(host_inputs[index])
                diff = np.abs(host.astype(np.int16) - pixels.astype(np.int16))
                record["input_diff_max"] = int(diff.max())
                # the kernels alone: the host's exact input through this device's interpreter (every
                # --kernel-every-th image: under emulation each such image costs a second invoke)
                if diff.any() and index % max(int(args.kernel_every or 1), 1) == 0:
                    record["host_input_scores"] = model.predict(np.ascontiguousarray(host)).tolist()
        print(json.dumps(record), flush=True)
    print(json.dumps({"device": device_facts()}), flush=True)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list", default=None, help="scores: a file with one image path per line")
    p.add_argument("--inputs", default=None, help="scores: the host's input crops (.npy, uint8 [N, S, S, 3])")
    p.add_argument("--first", default=None, help="scores: start at this index of --list")
    p.add_argument("--step", default=None, help="scores: take every STEP-th image (one process of several)")
    p.add_argument("--cpu", action="store_true", help="scores: run an accelerator bundle's model on the CPU")
    p.add_argument("--kernel-every", default=None, help="scores: the host's inputs on every K-th image only")


def main_scores(args: argparse.Namespace) -> int:
    if not args.list:
        raise ValueError("scores needs --list FILE (one image path per line)")
    sys.stdout.reconfigure(line_buffering=True)
    return scores(args)
