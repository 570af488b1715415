"""Another runtime's answers: the bundle's model in MediaPipe Tasks' ImageClassifier, which loads it by
its TFLite metadata alone. MediaPipe needs numpy 2 and so lives in its own environment: PYTHON (``edgetl
check RUN --on-target TARGET --mediapipe PYTHON``) is an interpreter that has ``mediapipe``.

MediaPipe resizes the whole frame to the input unless told a region of interest; edgetl's preprocessing
resizes the shorter side and crops the centre. Given the region edgetl crops — the centred square,
``image_size / resize_size`` of the shorter side — MediaPipe sees the same part of the photo, and only
the resampling differs (its bilinear against edgetl's area resize). The images are classified twice:
the photos with that region (what a MediaPipe user gets), and the host's exact input crops (the same
pixels edgetl's int8 model was judged on, so the output difference is MediaPipe's runtime alone).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from edgetl.ontarget.emulate import DeviceRunError, DeviceScores, how_it_ended

SCRIPT = Path(__file__).with_name("mediapipe_classify.py")


def _classify(python: str, model: Path, fraction: float, images: list[str]) -> tuple[list[dict], dict]:
    try:
        done = subprocess.run([python, str(SCRIPT), str(model), str(fraction), *images], capture_output=True,
                              text=True, timeout=120 + 2 * len(images))  # fmt: skip
    except FileNotFoundError:
        raise DeviceRunError(f"no interpreter at {python}",
                             hint="point --mediapipe at a Python that has mediapipe") from None  # fmt: skip
    except subprocess.TimeoutExpired:
        raise DeviceRunError(f"MediaPipe did not finish {len(images)} images in time") from None
    if done.returncode != 0:
        missing = "No module named 'mediapipe'" in done.stderr
        raise DeviceRunError(f"{python} has no mediapipe" if missing else
                             f"MediaPipe {how_it_ended(done.returncode, done.stderr)}",
                             hint="pip install mediapipe into that interpreter's environment")  # fmt: skip
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    device = next((line["device"] for line in lines if "device" in line), {})
    return [line for line in lines if "i" in line], device


def run_mediapipe(python: str, model: Path, paths: list[str], host_inputs: np.ndarray, fraction: float,
                  num_classes: int) -> DeviceScores:  # fmt: skip
    """MediaPipe's scores on the photos (region of interest) and on the host's input crops."""
    import cv2

    started = time.perf_counter()
    photos, device = _classify(python, model, fraction, paths)
    with tempfile.TemporaryDirectory(prefix="edgetl-mediapipe-") as tmp:
        crops = []
        for index, pixels in enumerate(host_inputs):
            crops.append(str(Path(tmp) / f"{index:06d}.png"))
            cv2.imwrite(crops[-1], cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2BGR))
        kernel, _ = _classify(python, model, 1.0, crops)

    def matrix(rows: list[dict]) -> np.ndarray:
        if len(rows) != len(paths):
            raise DeviceRunError(f"MediaPipe returned {len(rows)} results for {len(paths)} images")
        out = np.zeros((len(rows), num_classes), np.float32)
        for row in rows:
            out[row["i"], : len(row["scores"])] = row["scores"][:num_classes]
        return out

    where = {**device, "kind": "runtime", "runtime": "MediaPipe Tasks ImageClassifier",
             "region": f"centred square, {fraction:.3f} of the shorter side", "board": "this host"}  # fmt: skip
    return DeviceScores(scores=matrix(photos), kernel_scores=matrix(kernel),
                        input_diff_max=np.full(len(paths), -1, np.int64), invoke_ms=[0.0] * len(paths),
                        where=where, seconds=time.perf_counter() - started)  # fmt: skip
