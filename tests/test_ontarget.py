"""Verified where it runs: the bundle's own runtime on an emulated Raspberry Pi CPU (qemu-user over a
Debian bookworm arm64 userland and the aarch64 wheels a Pi's pip resolves), and the package gate on it.

The emulated runs use the session's exported model (64 px) on its validation images; the userland and
wheels are built once per session (the first test that needs them pays ~40 s, with the network of the
package registries). Skipped with the reason where qemu-user-static or debootstrap is not installed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import copy_run

from edgetl.cli import main
from edgetl.rundir import read_manifest
from edgetl.targets import load_target

pytestmark = pytest.mark.slow

TOOLS = ("qemu-aarch64-static", "debootstrap", "dpkg-deb")
needs_emulation = pytest.mark.skipif(
    not all(shutil.which(t) for t in TOOLS),
    reason="needs Debian's qemu-user-static and debootstrap (make test installs them as root)",
)


def pi_target(folder, name: str = "pi-test", **parity) -> str:
    """rpi4-cpu at the session model's 64 px, with the loose thresholds of its 32 validation images."""
    text = open(load_target("rpi4-cpu").source).read().replace("size = 224", "size = 64")
    text = text.replace('name = "rpi4-cpu"', f'name = "{name}"')
    text = text.replace("max_drop = 1.0", "max_drop = 10.0").replace("min_agreement = 0.98", "min_agreement = 0.85")
    for key, value in parity.items():
        text = text.replace("[parity]", f"[parity]\n{key} = {value}", 1)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return str(path)


def cli(*args):
    return CliRunner().invoke(main, ["-q", *args])


@pytest.fixture(scope="module")
def checked(exported_run, tmp_path_factory):
    """``edgetl check RUN --on-target`` on a copy of the exported run, run once: (result, run_dir, target)."""
    if not all(shutil.which(t) for t in TOOLS):
        pytest.skip("needs qemu-user-static and debootstrap")
    base = tmp_path_factory.mktemp("on-target")
    run_dir = copy_run(exported_run[1], base / "run")
    target = pi_target(base)
    result = cli("check", str(run_dir), "--on-target", target, "--json")
    return result, run_dir, target


@needs_emulation
def test_check_on_target_runs_the_bundle_on_an_emulated_pi(checked):
    result, run_dir, _ = checked
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    where = record["where"]
    assert where["kind"] == "emulated" and where["machine"] == "aarch64" and where["cpu"] == "cortex-a72"
    assert where["python"].startswith("3.11") and "ai-edge-litert" in where["versions"]
    assert "numpy" in where["versions"] and where["versions"]["ai-edge-litert"] in record["described"]
    count = read_manifest(run_dir)["stages"]["check"]["data"]["count"]
    assert record["count"] == count and record["passed"] is True
    # the device's top-1 against the host int8's: the same model, other kernels; outputs within a few steps
    assert record["agreement_with_host"] >= 0.9 and record["max_output_diff_steps"] is not None
    verdicts = read_manifest(run_dir)["stages"]["on_target"]["verdicts"]
    assert [v["target"] for v in verdicts.values()] == ["pi-test"]
    assert "## Where it runs" in (run_dir / "parity.md").read_text()
    assert read_manifest(run_dir)["stages"]["check"]["passed"]  # the host verdict stays
    page = (run_dir / "report.html").read_text()
    assert "Where it runs" in page and "emulated cortex-a72" in page


@needs_emulation
def test_package_ships_the_verdict_and_reuses_it(checked, tmp_path, monkeypatch):
    _, run_dir, target = checked
    import edgetl.ontarget.verdict as verdict

    def no_emulation(*args, **kwargs):
        raise AssertionError("package emulated again although the model is unchanged")

    monkeypatch.setattr(verdict, "run_emulated", no_emulation)
    first = cli("package", str(run_dir), "--target", target, "--out", str(tmp_path / "a"), "--json", "--on-target")
    assert first.exit_code == 0, first.output
    again = cli("package", str(run_dir), "--target", target, "--out", str(tmp_path / "b"), "--json", "--on-target")
    assert json.loads(again.stdout)["archive_sha256"] == json.loads(first.stdout)["archive_sha256"]
    shipped = json.loads((tmp_path / "a" / "run-pi-test" / "manifest.json").read_text())["on_target"]
    assert shipped["passed"] and shipped["where"]["cpu"] == "cortex-a72" and "seconds" not in shipped


def fake_device(agree: bool):
    """A stand-in for the emulated run: the host int8's scores, or the same with every top-1 moved."""
    from edgetl.ontarget.emulate import DeviceScores

    def run(bundle, paths, host_inputs, *args, **kwargs):
        from edgetl.check.runners import runner_for

        model = json.loads((bundle / "manifest.json").read_text())["model"]
        scores = runner_for(bundle / model)(host_inputs)
        if not agree:
            scores = np.roll(scores, 1, axis=1)
        where = {"kind": "emulated", "cpu": "cortex-a72", "machine": "aarch64", "python": "3.11.2",
                 "versions": {"ai-edge-litert": "9.9.9"}}  # fmt: skip
        return DeviceScores(scores, scores, np.zeros(len(paths), np.int64), [1.0] * len(paths), where, 1.0)

    return run


def test_a_failed_on_target_verdict_refuses_the_package_with_exit_3(exported_run, tmp_path, monkeypatch):
    import edgetl.ontarget.userland as userland
    import edgetl.ontarget.verdict as verdict

    monkeypatch.setattr(userland, "find_tool", lambda *names: "/usr/bin/true")
    monkeypatch.setattr(verdict, "run_emulated", fake_device(agree=False))
    run_dir = copy_run(exported_run[1], tmp_path / "run")
    outcome = cli("package", str(run_dir), "--target", pi_target(tmp_path), "--out", str(tmp_path / "out"),
                  "--on-target")
    assert outcome.exit_code == 3
    assert "failed parity on aarch64, emulated cortex-a72, ai-edge-litert 9.9.9" in outcome.stderr
    assert not (tmp_path / "out" / "run-pi-test").exists()  # nothing shipped
    forced = cli("package", str(run_dir), "--target", pi_target(tmp_path), "--out", str(tmp_path / "out"), "--force",
                 "--on-target")
    assert forced.exit_code == 0, forced.output
    manifest = json.loads((tmp_path / "out" / "run-pi-test" / "manifest.json").read_text())
    assert manifest["on_target"]["passed"] is False
    from edgetl.runtime.bundle import open_bundle

    warnings = open_bundle(tmp_path / "out" / "run-pi-test").warnings()
    assert any("FAILED parity on aarch64, emulated cortex-a72" in w for w in warnings)


def test_missing_emulator_is_exit_5_naming_the_packages(exported_run, tmp_path, monkeypatch):
    import edgetl.ontarget.userland as userland

    monkeypatch.setattr(userland, "find_tool", lambda *names: None)
    run_dir = copy_run(exported_run[1], tmp_path / "run")
    target = pi_target(tmp_path)
    missing = cli("package", str(run_dir), "--target", target, "--out", str(tmp_path / "out"), "--on-target")
    assert missing.exit_code == 5 and "apt-get install qemu-user-static debootstrap" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.output
    checked = cli("check", str(run_dir), "--on-target", target)
    assert checked.exit_code == 5
    skipped = cli("package", str(run_dir), "--target", target, "--out", str(tmp_path / "out"), "--no-on-target")
    assert skipped.exit_code == 0, skipped.output
    manifest = json.loads((tmp_path / "out" / "run-pi-test" / "manifest.json").read_text())
    assert manifest["on_target"] == {"skipped": "packaged with --no-on-target"}


def test_on_target_usage_errors(exported_run, tmp_path):
    run_dir = exported_run[1]
    assert cli("check", str(run_dir), "--ssh", "pi").exit_code == 2
    assert cli("check", str(run_dir), "--mediapipe", "python3").exit_code == 2
    assert cli("check", str(run_dir), "--on-target", "rpi4-cpu", "--max-drop", "3").exit_code == 2
    no_cpu = cli("check", str(run_dir), "--on-target", "mcu-tflm")
    assert no_cpu.exit_code == 2 and "emulate" in no_cpu.stderr
    unnamed = cli("check", str(run_dir), "--on-target")  # the run has no bundle to take the target from
    assert unnamed.exit_code == 2 and "--on-target needs a target name" in unnamed.stderr


@needs_emulation
def test_a_damaged_userland_is_rebuilt_not_trusted(checked, caplog):
    from edgetl.ontarget import userland as ul

    land = ul.Userland.parse("debian-bookworm-arm64")
    qemu = ul.require_tools()
    folder = ul.ensure_userland(land, qemu)  # the session's, already built by `checked`
    python = folder / "usr" / "bin" / "python3.11"
    python.write_bytes(b"not an interpreter")  # damaged in place; its ready-marker stays
    assert not ul.python_runs(folder, qemu, "3.11")
    with caplog.at_level("WARNING"):
        assert ul.ensure_userland(land, qemu) == folder
    assert ul.python_runs(folder, qemu, "3.11") and "incomplete or broken; building it again" in caplog.text


@needs_emulation
def test_no_network_for_the_userland_or_the_wheels_is_one_line(checked, tmp_path, monkeypatch):
    import os

    _, run_dir, _ = checked
    session_cache = os.environ["EDGETL_EMULATION_DIR"]  # its userland is built
    monkeypatch.setenv("EDGETL_EMULATION_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("EDGETL_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")  # nothing listens there
    no_mirror = cli("check", str(run_dir), "--on-target", pi_target(tmp_path))
    assert no_mirror.exit_code == 1 and "debootstrap could not fetch debian-bookworm-arm64" in no_mirror.stderr
    assert len(no_mirror.stderr.strip().splitlines()) == 1
    monkeypatch.delenv("EDGETL_DEBIAN_MIRROR")
    monkeypatch.setenv("EDGETL_EMULATION_DIR", session_cache)
    for key, value in {"PIP_CONFIG_FILE": "/dev/null", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                       "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0",
                       "PIP_TIMEOUT": "2"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    target = pi_target(tmp_path, name="pi-six")
    text = open(target).read().replace('"opencv-python-headless>=4.5"]', '"opencv-python-headless>=4.5", "six"]')
    open(target, "w").write(text)  # requirements no cached wheel folder holds
    no_index = cli("check", str(run_dir), "--on-target", target)
    assert no_index.exit_code == 1 and "cannot fetch the aarch64 wheels" in no_index.stderr, no_index.output
    assert len(no_index.stderr.strip().splitlines()) == 1


def test_how_a_device_run_ended_is_said_in_words():
    from edgetl.ontarget.emulate import describe, how_it_ended

    assert how_it_ended(-11, "") == "crashed (SIGSEGV)"
    assert how_it_ended(1, "edgetl-runtime: error: cannot decode x.jpg\n") == \
        "failed (exit 1: edgetl-runtime: error: cannot decode x.jpg)"  # fmt: skip
    where = {"kind": "emulated", "cpu": "cortex-a76", "versions": {"ai-edge-litert": "2.1.6"}}
    assert describe(where) == "aarch64, emulated cortex-a76, ai-edge-litert 2.1.6"
    board = {"kind": "board", "board": "Raspberry Pi 4 Model B Rev 1.5", "machine": "aarch64", "versions": {}}
    assert describe(board) == "Raspberry Pi 4 Model B Rev 1.5 (aarch64)"
