"""Edge TPU: the compiler's log parser on realistic output, and packaging with and without a compiler."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.package.edgetpu import MAPPED, parse_log
from edgetl.rundir import read_manifest
from edgetl.targets import load_target

FIXTURES = Path(__file__).parent / "fixtures" / "edgetpu"


def test_parse_all_ops_mapped():
    report = parse_log((FIXTURES / "all_mapped.txt").read_text())
    assert report.compiled and report.compiler_version == "16.0.384591198"
    assert report.total_ops == 72 and report.tpu_ops == 72 and report.cpu_ops == 0
    assert report.mapped_fraction == 1.0 and report.cpu_operations == []
    assert report.on_chip_bytes == round(2.76 * 1024**2) and report.off_chip_bytes == 0
    assert report.subgraphs == 1
    assert {r["op"] for r in report.operations} >= {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}


def test_parse_ops_left_on_the_cpu():
    report = parse_log((FIXTURES / "some_on_cpu.txt").read_text())
    assert report.compiled and report.total_ops == 74 and report.tpu_ops == 71 and report.cpu_ops == 3
    assert report.mapped_fraction == pytest.approx(71 / 74)
    assert [r["op"] for r in report.cpu_operations] == ["SUB", "MUL", "SOFTMAX"]
    assert all(r["status"] != MAPPED for r in report.cpu_operations)
    assert report.off_chip_bytes == round(3.23 * 1024**2) and report.on_chip_remaining_bytes == round(1.75 * 1024)


def test_parse_compiler_error():
    report = parse_log((FIXTURES / "error.txt").read_text())
    assert not report.compiled
    assert report.error == "Compilation failed due to large activation tensors in model."


@pytest.fixture
def coral_target(exported_run, tmp_path):
    _, run_dir = exported_run
    side = read_manifest(run_dir)["stages"]["export"]["artifacts"]["model_int8.tflite"]["input"]["shape"][1]
    path = tmp_path / "coral.toml"
    path.write_text(open(load_target("coral-edgetpu").source).read().replace("size = 224", f"size = {side}"))
    return run_dir, path


def _package(run_dir, target, out, *extra, env=None):
    args = ["-q", "package", str(run_dir), "--target", str(target), "--out", str(out), "--force", "--json", *extra]
    return CliRunner().invoke(main, args, env=env)


def _fake_compiler(folder: Path, log: str) -> dict[str, str]:
    """An edgetpu_compiler stand-in: prints ``log`` and writes <model>_edgetpu.tflite into -o DIR."""
    folder.mkdir()
    script = folder / "edgetpu_compiler"
    script.write_text(f"""#!/bin/sh
out=.; while [ $# -gt 1 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
name=$(basename "$1" .tflite); cp "$1" "$out/${{name}}_edgetpu.tflite"
cat '{log}'
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_missing_compiler_is_a_clear_error_and_no_compile_ships_a_script(coral_target, tmp_path, monkeypatch):
    run_dir, target = coral_target
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no edgetpu_compiler anywhere
    missing = _package(run_dir, target, tmp_path / "b")
    assert missing.exit_code == 5, missing.output
    assert "edgetpu_compiler is not on PATH" in missing.stderr and "--no-compile" in missing.stderr
    assert not (tmp_path / "b").exists()
    shipped = _package(run_dir, target, tmp_path / "b", "--no-compile")
    assert shipped.exit_code == 0, shipped.output
    bundle = Path(json.loads(shipped.stdout)["bundle_dir"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["accelerator"] == {"tool": "edgetpu_compiler", "compiled": False, "script": "compile_edgetpu.sh"}
    script = (bundle / "compile_edgetpu.sh").read_text()
    assert "edgetpu_compiler --min_runtime_version 14 -s -o . model_int8.tflite" in script


def test_ops_on_the_cpu_fail_with_exit_7_unless_allowed(coral_target, tmp_path):
    run_dir, target = coral_target
    env = _fake_compiler(tmp_path / "bin", str(FIXTURES / "some_on_cpu.txt"))
    refused = _package(run_dir, target, tmp_path / "b", env=env)
    assert refused.exit_code == 7, refused.output
    assert "3 of 74 operations would run on the CPU" in refused.stderr and "SOFTMAX" in refused.stderr
    allowed = _package(run_dir, target, tmp_path / "b", "--allow-cpu-ops", env=env)
    assert allowed.exit_code == 0, allowed.output
    bundle = Path(json.loads(allowed.stdout)["bundle_dir"])
    accel = json.loads((bundle / "manifest.json").read_text())["accelerator"]
    assert accel["compiled"] and accel["cpu_ops"] == 3 and accel["mapped_fraction"] == pytest.approx(71 / 74)
    assert (bundle / "model_int8_edgetpu.tflite").is_file() and (bundle / "edgetpu_compiler.log").is_file()


def test_all_mapped_compiles_into_the_bundle(coral_target, tmp_path):
    run_dir, target = coral_target
    env = _fake_compiler(tmp_path / "bin", str(FIXTURES / "all_mapped.txt"))
    result = _package(run_dir, target, tmp_path / "b", env=env)
    assert result.exit_code == 0, result.output
    bundle = Path(json.loads(result.stdout)["bundle_dir"])
    accel = json.loads((bundle / "manifest.json").read_text())["accelerator"]
    assert accel["mapped_fraction"] == 1.0 and accel["on_chip_bytes"] > 0 and accel["off_chip_bytes"] == 0

    # The device runtime runs the compiled model through the Edge TPU delegate; without libedgetpu
    # (as here) that is a one-line error, not a traceback or a silent CPU fallback.
    from PIL import Image

    Image.new("RGB", (80, 60), (120, 30, 200)).save(tmp_path / "frame.png")
    proc = subprocess.run([sys.executable, "-m", "edgetl_runtime", ".", str(tmp_path / "frame.png")], cwd=bundle,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "cannot load the Edge TPU delegate" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2
