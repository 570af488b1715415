"""Bundles: reproducible archives, tamper detection, constraints, the device runtime, make."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO
from test_imports import run_blocked

from edgetl.cli import main
from edgetl.rundir import read_manifest
from edgetl.targets import load_target

pytestmark = pytest.mark.slow


def target_file(tmp_path, size: int = 64, **constraints) -> str:
    text = open(load_target("rpi4-cpu").source).read().replace("size = 224", f"size = {size}")
    text = text.replace('name = "rpi4-cpu"', 'name = "rpi4-test"')
    text = text.replace("max_drop = 1.0", "max_drop = 10.0").replace("min_agreement = 0.98", "min_agreement = 0.85")
    for key, value in constraints.items():
        text = text.replace("[constraints]", f"[constraints]\n{key} = {value}").replace(
            "max_model_bytes = 16_000_000\n", "" if key == "max_model_bytes" else "max_model_bytes = 16_000_000\n"
        )
    path = tmp_path / "rpi4-test.toml"
    path.write_text(text)
    return str(path)


def package(run_dir, target, out, *extra):
    return CliRunner().invoke(main, ["-q", "package", str(run_dir), "--target", target, "--out", str(out),
                                     "--json", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def bundle(exported_run, tmp_path_factory):
    _, run_dir = exported_run
    base = tmp_path_factory.mktemp("bundle")
    result = package(run_dir, target_file(base), base / "out")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), run_dir, base


def test_packaging_twice_gives_byte_identical_archives(bundle, monkeypatch):
    payload, run_dir, base = bundle
    again = package(run_dir, target_file(base), base / "again")
    assert json.loads(again.stdout)["archive_sha256"] == payload["archive_sha256"]
    first = open(payload["archive"], "rb").read()
    assert hashlib.sha256(first).hexdigest() == payload["archive_sha256"]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    later = json.loads(package(run_dir, target_file(base), base / "later").stdout)
    assert later["archive_sha256"] != payload["archive_sha256"]
    with tarfile.open(later["archive"]) as tar:
        members = tar.getmembers()
        assert {m.mtime for m in members} == {1700000000}
        assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
        names = [m.name for m in members if m.isfile()]
        assert names == sorted(names)
    assert open(payload["archive"], "rb").read()[4:8] == b"\0\0\0\0"  # gzip header without a time


def test_bundle_is_self_describing(bundle):
    payload, run_dir, _ = bundle
    root = payload["bundle_dir"]
    manifest = json.load(open(f"{root}/manifest.json"))
    assert manifest["kind"] == "edgetl-bundle" and manifest["schema_version"] == 1
    assert manifest["model"] == "model_int8.tflite" and manifest["target"]["name"] == "rpi4-test"
    assert manifest["io"]["input"]["dtype"] == "uint8" and manifest["preprocess"]["image_size"] == 64
    assert manifest["parity"]["passed_for_target"] is True and manifest["forced"] is False
    assert len(manifest["calibration"]["sha256"]) == 64
    assert manifest["training"]["run_model_sha256"] == read_manifest(run_dir)["files"]["model.pt"]["sha256"]
    assert manifest["training"]["qat_weights_sha256"] is None  # not a QAT run
    assert {"torch", "tensorflow", "onnx2tf"} <= set(manifest["versions"])
    for rel, entry in manifest["files"].items():
        data = open(f"{root}/{rel}", "rb").read()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
    assert "edgetl_runtime/__main__.py" in manifest["files"]
    requirements = open(f"{root}/requirements-device.txt").read()
    assert "ai-edge-litert" in requirements and "torch" not in requirements and "tensorflow" not in requirements
    assert "pip install -r requirements-device.txt" in open(f"{root}/README.txt").read()


def test_verify_passes_then_catches_one_changed_byte(bundle, tmp_path):
    payload, _, _ = bundle
    for source in (payload["bundle_dir"], payload["archive"]):
        ok = CliRunner().invoke(main, ["verify", source, "--json"])
        assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"] is True
    copy = shutil.copytree(payload["bundle_dir"], tmp_path / "copy")
    model = copy / "model_int8.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    bad = CliRunner().invoke(main, ["verify", str(copy), "--json"])
    assert bad.exit_code == 6
    assert json.loads(bad.stdout)["problems"] == ["model_int8.tflite: sha256 differs from the manifest"]
    runtime = subprocess.run([sys.executable, "-m", "edgetl_runtime", ".", "labels.txt"], cwd=copy,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert runtime.returncode == 6 and "fails verification" in runtime.stderr
    (copy / "extra.py").write_text("print('not shipped')")
    assert "extra.py: not in the manifest" in CliRunner().invoke(main, ["verify", str(copy)]).stdout


def test_bundle_runs_without_torch_tensorflow_onnx_or_click(bundle, exported_run):
    payload, run_dir, _ = bundle
    root = read_manifest(run_dir)["stages"]["finetune"]["data"]["root"]
    test_images = sorted(f"{root}/test/{cls}" for cls in ("circle", "cross", "square", "triangle"))
    bundle_dir = payload["bundle_dir"]
    code = f"""
        import json, runpy, io, contextlib
        sys.argv = ["edgetl_runtime", {bundle_dir!r}, *{test_images!r}, "--json", "--top-k", "1"]
        sys.path.insert(0, {bundle_dir!r})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                runpy.run_module("edgetl_runtime", run_name="__main__")
            except SystemExit as exc:
                assert exc.code in (0, None), exc.code
        rows = [json.loads(line) for line in out.getvalue().splitlines()]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "tensorflow", "onnx", "click"}})
        print(json.dumps({{"rows": rows, "heavy": heavy}}))
    """
    proc = run_blocked({"torch", "torchvision", "tensorflow", "onnx", "onnxruntime", "click", "edgetl"}, code)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert len(result["rows"]) == 40  # 4 classes x 10 test images
    correct = np.mean([r["top"][0]["label"] == r["source"].split("/")[-2] for r in result["rows"]])
    assert correct >= 0.7  # the int8 model on the device still classifies the held-out images


def test_constraint_violations_exit_4(exported_run, tmp_path):
    _, run_dir = exported_run
    wrong_size = package(run_dir, "rpi4-cpu", tmp_path / "a")
    assert wrong_size.exit_code == 4 and "needs 224x224" in wrong_size.stderr
    too_big = package(run_dir, target_file(tmp_path, max_model_bytes=1000), tmp_path / "b")
    assert too_big.exit_code == 4 and "over the target's 1,000" in too_big.stderr
    assert not (tmp_path / "b").exists()  # nothing written


def test_package_without_export_is_a_clear_error(toy_run, tmp_path):
    result = package(toy_run[1], "rpi4-cpu", tmp_path)
    assert result.exit_code == 1 and "has no model_int8.tflite" in result.stderr


def test_make_model_is_incremental(toy_data, tmp_path, netguard_log):
    data = shutil.copytree(toy_data, tmp_path / "data")
    target = tmp_path / "toy32.toml"
    target.write_text(open(load_target("rpi4-cpu").source).read().replace("size = 224", "size = 32")
                      .replace('name = "rpi4-cpu"', 'name = "toy32"'))  # fmt: skip
    make = ["make", "-f", str(REPO / "edgetl" / "edgetl.mk"), "model", f"DATA={data}", f"TARGET={target}",
            f"MODEL_DIR={tmp_path / 'build'}", f"EDGETL={sys.executable} -m edgetl",
            "FINETUNE_FLAGS=--weights none --width 0.35 --head-epochs 1 --finetune-epochs 1 --batch-size 16"]

    def planned() -> set[str]:
        out = subprocess.run([*make, "-n"], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
        return {step for step in ("finetune", "export", "package") if f"-m edgetl {step} " in out}

    first = subprocess.run(make, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "build" / "bundles" / "run-toy32.tar.gz").is_file()
    assert planned() == set()  # unchanged inputs: nothing to do
    target.write_text(target.read_text().replace("max_drop = 1.0", "max_drop = 1.5"))
    assert planned() == {"export", "package"}  # parity thresholds: no retraining
    (data / "circle" / "0000.png").write_bytes((data / "cross" / "0000.png").read_bytes())
    assert planned() == {"finetune", "export", "package"}
