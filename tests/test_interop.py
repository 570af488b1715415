"""Models other tools load as they are: MediaPipe Tasks' ImageClassifier on edgetl's bundle model.

MediaPipe needs numpy 2, which clashes with TensorFlow 2.19's pins, so it lives in its own virtualenv
(``.venv-mediapipe`` beside the project's, built once from the package registry and reused; rebuilt
when this file's pin changes). Without the registry the test skips and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, copy_run
from test_package import target_file

from edgetl.cli import main

pytestmark = pytest.mark.slow

MEDIAPIPE = "mediapipe==1.2.3"
VENV = REPO / ".venv-mediapipe"
SCRIPT = REPO / "edgetl" / "ontarget" / "mediapipe_classify.py"


def mediapipe_python() -> Path:
    """The interpreter of a virtualenv with MediaPipe (built into a temporary folder, renamed when whole)."""
    python, stamp = VENV / "bin" / "python", VENV / ".installed"
    if stamp.is_file() and stamp.read_text() == MEDIAPIPE:
        return python
    building = VENV.with_name(VENV.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    made = subprocess.run([sys.executable, "-m", "venv", str(building)], capture_output=True, text=True)
    # pip may reach the package registry: without the tests' network guard (tests/netguard), which the
    # classification itself keeps
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    pip = [str(building / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", MEDIAPIPE]
    installed = made.returncode == 0 and subprocess.run(pip, capture_output=True, timeout=900, env=env).returncode == 0
    if not installed:
        shutil.rmtree(building, ignore_errors=True)
        pytest.skip(f"could not install {MEDIAPIPE} into a virtualenv (no package registry?)")
    (building / ".installed").write_text(MEDIAPIPE)
    shutil.rmtree(VENV, ignore_errors=True)
    building.rename(VENV)  # the venv's scripts keep the building path; only bin/python is used
    return python


@pytest.fixture(scope="module")
def bundle(exported_run, tmp_path_factory):
    run_dir = copy_run(exported_run[1], tmp_path_factory.mktemp("interop") / "run")
    result = CliRunner().invoke(main, ["-q", "package", str(run_dir), "--target", target_file(run_dir.parent),
                                       "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout)["bundle_dir"]), run_dir


def val_images(run_dir: Path) -> list[str]:
    from edgetl.data.folders import discover
    from edgetl.rundir import read_manifest

    stage = read_manifest(run_dir)["stages"]["finetune"]
    return [str(s.path) for s in discover(stage["data"]["root"], stage["config"]["val_fraction"],
                                          stage["config"]["seed"]).val]  # fmt: skip


def edgetl_top1(model_or_bundle: str, images: list[str], *labels: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "edgetl", "run", model_or_bundle, *labels, *images, "--json",
                             "--top-k", "1"], capture_output=True, text=True, check=True)  # fmt: skip
    return [json.loads(line)["top"][0]["label"] for line in result.stdout.splitlines() if line.startswith("{")]


def model_inputs(run_dir: Path, images: list[str], folder: Path) -> list[str]:
    """Each image as edgetl's preprocessing crops it for the model, saved losslessly: MediaPipe then
    sees the same pixels (its own resize is bilinear and stretches, edgetl's is area and centre-crops),
    so any difference left is in loading the model, its metadata and its output."""
    from PIL import Image

    from edgetl.rundir import read_manifest
    from edgetl.runtime.preprocess import PreprocessSpec, load_image, prepare

    spec = PreprocessSpec.from_dict(read_manifest(run_dir)["stages"]["finetune"]["preprocess"])
    folder.mkdir()
    paths = []
    for index, path in enumerate(images):
        paths.append(str(folder / f"{index:04d}.png"))
        Image.fromarray(prepare(load_image(path), spec)).save(paths[-1])
    return paths


@pytest.mark.parametrize("artifact", ["model_int8.tflite", "model_float32.tflite"])
def test_mediapipe_classifies_with_the_labels_by_name_as_edgetl_does(bundle, artifact, tmp_path):
    bundle_dir, run_dir = bundle
    python = mediapipe_python()
    model = bundle_dir / artifact if artifact == "model_int8.tflite" else run_dir / artifact
    images = val_images(run_dir)
    crops = model_inputs(run_dir, images, tmp_path / "crops")
    out = subprocess.run([str(python), str(SCRIPT), str(model), "1.0", *crops], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = [json.loads(line)["label"] for line in out.stdout.splitlines() if line.startswith('{"i"')]
    plain = ["--labels", str(run_dir / "labels.txt"), "--crop-fraction", str(crop_fraction(run_dir))]
    ours = edgetl_top1(str(bundle_dir) if artifact == "model_int8.tflite" else str(model), images,
                       *([] if artifact == "model_int8.tflite" else plain))
    labels = (run_dir / "labels.txt").read_text().split()
    assert len(theirs) == len(ours) == len(images) and set(theirs) <= set(labels)  # names, from the metadata
    agreement = sum(a == b for a, b in zip(theirs, ours, strict=True)) / len(images)
    assert agreement >= 0.99, (agreement, list(zip(theirs, ours, strict=True)))


def crop_fraction(run_dir: Path) -> float:
    from edgetl.rundir import read_manifest

    preprocess = read_manifest(run_dir)["stages"]["finetune"]["preprocess"]
    return preprocess["image_size"] / preprocess["resize_size"]


def test_mediapipe_verdict_is_recorded_beside_the_host_one(bundle):
    """`edgetl check RUN --on-target T --mediapipe PYTHON`: MediaPipe on the validation photos with the
    region of interest edgetl crops, and on the host's exact crops (the runtime alone)."""
    _, run_dir = bundle
    python = mediapipe_python()
    result = CliRunner().invoke(main, ["-q", "check", str(run_dir), "--on-target", target_file(run_dir.parent),
                                       "--mediapipe", str(python), "--json"])  # fmt: skip
    assert result.exit_code in (0, 3), result.output
    record = json.loads(result.stdout)
    assert record["where"]["kind"] == "runtime" and record["where"]["versions"]["mediapipe"] == MEDIAPIPE.split("==")[1]
    assert record["count"] == len(val_images(run_dir)) and "region of interest" in record["described"]
    # on the host's own crops MediaPipe runs the same LiteRT kernels: the same top-1 as edgetl's int8
    assert record["kernel_agreement_with_host"] == 1.0 and record["max_output_diff_steps"] <= 1
    assert record["inputs_differing"] is None  # MediaPipe resamples the photo itself
    from edgetl.rundir import read_manifest

    assert any(k.endswith("@ mediapipe") for k in read_manifest(run_dir)["stages"]["on_target"]["verdicts"])
