"""Does MediaPipe Tasks' ImageClassifier give edgetl's answers on real photos? The run's int8 bundle
model on its validation photos, classified by edgetl's device runtime and by MediaPipe (in its own
virtualenv: numpy 2), once as MediaPipe does by default (the whole frame stretched to the input) and
once with the region of interest edgetl's preprocessing crops (the centred square, ``image_size /
resize_size`` of the shorter side). Reports top-1 against the labels and top-1 agreement with edgetl.
Writes ``results/mediapipe_agreement_<tag>.{json,md}``.

    python benchmarks/mediapipe_agreement.py RUN [--mediapipe-python .venv-mediapipe/bin/python] [--tag T]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finished_run, machine, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "edgetl" / "ontarget" / "mediapipe_classify.py"


def validation_photos(run: Path) -> tuple[list[str], list[str]]:
    from edgetl.data.folders import discover
    from edgetl.rundir import read_manifest

    stage = read_manifest(run)["stages"]["finetune"]
    samples = discover(stage["data"]["root"], stage["config"]["val_fraction"], stage["config"]["seed"]).val
    classes = (run / "labels.txt").read_text().split()
    return [str(s.path) for s in samples], [classes[s.label] for s in samples]


def edgetl_labels(bundle: Path, images: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "edgetl", "run", str(bundle), *images, "--json", "--top-k", "1"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return [json.loads(line)["top"][0]["label"] for line in out.splitlines() if line.startswith("{")]


def mediapipe_labels(python: str, model: Path, fraction: float, images: list[str]) -> list[str]:
    out = subprocess.run([python, str(SCRIPT), str(model), str(fraction), *images], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return [json.loads(line)["label"] for line in out.splitlines() if line.startswith('{"i"')]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--mediapipe-python", default=str(REPO / ".venv-mediapipe" / "bin" / "python"))
    p.add_argument("--tag", default="run")
    args = p.parse_args()
    run = finished_run(args.run)
    if run is None:
        return
    from edgetl.rundir import read_manifest

    preprocess = read_manifest(run)["stages"]["finetune"]["preprocess"]
    fraction = preprocess["image_size"] / preprocess["resize_size"]
    images, truth = validation_photos(run)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "edgetl", "-q", "package", str(run), "--target", "rpi4-cpu",
                               "--out", tmp, "--no-on-target", "--json"], capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"package failed: {done.stderr.strip()}")
        bundle = Path(json.loads(done.stdout)["bundle_dir"])
        ours = edgetl_labels(bundle, images)
        rows = [{"classifier": "edgetl runtime (resize shorter side, centre crop, area)", "labels": ours}]
        for name, value in (("MediaPipe, default (whole frame stretched)", 0.0),
                            (f"MediaPipe, region of interest = centred square, {fraction:.3f} of the shorter side",
                             fraction)):  # fmt: skip
            rows.append({"classifier": name, "labels": mediapipe_labels(args.mediapipe_python,
                                                                      bundle / "model_int8.tflite", value, images)})
    for row in rows:
        row["top1"] = sum(a == b for a, b in zip(row["labels"], truth, strict=True)) / len(truth)
        row["agreement_with_edgetl"] = sum(a == b for a, b in zip(row["labels"], ours, strict=True)) / len(ours)
    result = {"machine": machine(), "run": str(run), "images": len(images), "crop_fraction": fraction, "rows": rows}
    lines = [f"# MediaPipe vs edgetl's runtime: {len(images)} validation photos of `{run}` (int8 bundle model)", "",
             "| classifier | top-1 | top-1 agreement with edgetl's runtime |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {r['classifier']} | {100 * r['top1']:.2f} % | {100 * r['agreement_with_edgetl']:.2f} % |"
              for r in rows]
    write_result(f"mediapipe_agreement_{args.tag}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
