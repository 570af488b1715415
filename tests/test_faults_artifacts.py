"""Fault injection, part 2: parity evidence, exports, bundles and the device runtime.

Same rules as part 1 (test_faults_input.py): the exit code, exactly one ``edgetl: error:`` (or
``edgetl-runtime: error:``) line, no traceback, nothing half-written that a later step would trust.
Commands that load a model run in a fresh process, so a crash shows as a signal, not as a dead test run.

| # | case | exit |
|---|---|---|
| P1 | `check --data` on 2 images rewrites the verdict; `package` refuses it | 3 |
| P2 | `check` on the val split with looser thresholds than the export's; `package` refuses it | 3 |
| P3 | `package --accept-weak-parity` ships it, records `evidence_waived`; the runtime warns | 0 |
| P4 | a re-check on the whole val split (32 images, under the default `min_images` 100) ships | 0 |
| P5 | a target whose `min_images` exceeds an export's own check on `--data` refuses it | 3 |
| P6 | a check on the val split fails, a later one on 2 images passes: `--accept-weak-parity` refuses | 3 |
| P7 | the same verdicts: `--force` ships, the manifest and the runtime name the failed verdict | 0 |
| P8 | a failed check on 2 images, a passing one on the whole val split: ships (the stronger stands) | 0 |
| P9 | a failed and a passing check on the same number of images: refused, waiver or not | 3 |
| B1 | truncated model in a bundle with a re-hashed manifest: `verify` | 6 |
| B2 | the same: `edgetl run` (no SIGSEGV) | 6 |
| B3 | the same: the device runtime `python -m edgetl.runtime` | 6 |
| B4 | truncated plain `.tflite`: `edgetl run` | 1 |
| B5 | truncated plain `.tflite`: `edgetl bench` | 1 |
| B6 | 0-byte `.tflite`: `edgetl run` | 1 |
| B7 | garbage `.tflite`: `edgetl run` | 1 |
| B8 | truncated `.tar.gz`: `verify` (no "Aborted!") | 1 |
| B9 | a text file named `.tar.gz`: `verify` | 1 |
| B10 | `labels.txt` with an extra line, manifest re-hashed: `verify` | 6 |
| B11 | `run --json` on a truncated model: one error object on stdout | 6 |
| B12 | `run --threads 0` | 2 |
| B13 | `bench --runs 0` | 2 |
| B14 | truncated int8 model in the run, run manifest re-hashed: `package` | 1 |
| B15 | the same: `check` | 1 |
| B16 | `package` into a read-only `--out` | 1 |
| E1 | `--calib-dir` holding a lossless re-encode (PNG -> BMP) of a validation image | 1 |
| E2 | SIGKILL of the export's main process: the converter child dies too; a rerun succeeds | -9, 0 |
| E3 | SIGINT during export: nothing exported is trusted | 130 |
| E4 | export after the dataset changed since fine-tuning | 1 |
| E5 | `export --data` with folders that are not classes of the model | 1 |
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import copy_run
from faults import (
    Outcome,
    alive,
    assert_one_error,
    children,
    cli,
    edgetl,
    kill,
    mounted_tmpfs,
    rehash,
    small_target,
    spawn,
    temporaries,
    truncate,
    wait_for,
)

from edgetl.rundir import read_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped(exported_run, tmp_path_factory):
    """The exported run, re-checked on its whole val split at its export's thresholds, and packaged
    for a 64-px rpi4 target: (run_dir, bundle_dir, target file, one validation image)."""
    base = tmp_path_factory.mktemp("faults-bundle")
    run = copy_run(exported_run[1], base / "run")
    target = small_target(base)
    outcome = cli("-q", "package", str(run), "--target", target, "--out", str(base / "out"), "--json")
    assert outcome.code == 0, outcome
    return run, base / "out" / "run-rpi4-faults", target, _val_images(run)[0]


def _val_images(run) -> list:
    from pathlib import Path

    stage = read_manifest(run)["stages"]["finetune"]
    return sorted(p for p in Path(stage["data"]["root"]).rglob("*.png") if "test" not in p.parts)


def _tiny(run, tmp_path, count: int = 2):
    """A --data folder with ``count`` images of the run's first class."""
    classes = read_manifest(run)["stages"]["finetune"]["labels"]
    tiny = tmp_path / "tiny" / classes[0]
    tiny.mkdir(parents=True)
    for image in [p for p in _val_images(run) if p.parent.name == classes[0]][:count]:
        shutil.copy(image, tiny / image.name)
    return tiny.parent


# ----------------------------------------------------------------------------- parity evidence


def test_a_verdict_on_two_images_cannot_replace_the_exports(shipped, tmp_path):
    """P1"""
    run = copy_run(shipped[0], tmp_path / "run")
    checked = cli("-q", "check", str(run), "--data", str(_tiny(run, tmp_path)), "--max-drop", "100",
                  "--min-agreement", "0")  # fmt: skip
    assert checked.code == 0, checked
    outcome = cli("package", str(run), "--target", shipped[2], "--out", str(tmp_path / "out"))
    assert_one_error(outcome, 3, "too weak to ship on", "rests on 2 images", "needs at least 32")
    assert not (tmp_path / "out" / "run-rpi4-faults").exists()


def test_looser_thresholds_than_the_exports_are_refused(shipped, tmp_path):
    """P2"""
    run = copy_run(shipped[0], tmp_path / "run")
    assert cli("-q", "check", str(run), "--max-drop", "50", "--min-agreement", "0.5").code == 0
    outcome = cli("package", str(run), "--target", shipped[2], "--out", str(tmp_path / "out"))
    assert_one_error(outcome, 3, "looser than the export's")


def test_accepting_weak_evidence_is_recorded_and_shown_on_the_device(shipped, tmp_path):
    """P3"""
    run = copy_run(shipped[0], tmp_path / "run")
    assert cli("-q", "check", str(run), "--data", str(_tiny(run, tmp_path))).code in (0, 3)
    if read_manifest(run)["stages"]["check"]["passed"] is False:
        pytest.skip("the two images happen to fail parity; P1 covers the refusal")
    outcome = cli("-q", "package", str(run), "--target", shipped[2], "--out", str(tmp_path / "out"),
                  "--accept-weak-parity", "--json")  # fmt: skip
    assert outcome.code == 0, outcome
    bundle = tmp_path / "out" / "run-rpi4-faults"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "rests on 2 images" in manifest["parity"]["evidence_waived"] and manifest["forced"] is False
    assert manifest["parity"]["data"]["count"] == 2 and len(manifest["parity"]["data"]["sha256"]) == 64
    ran = edgetl("run", str(bundle), str(shipped[3]))
    assert ran.code == 0 and "WARNING: this model's parity evidence is weaker" in ran.stderr, ran


def test_a_recheck_on_the_whole_val_split_ships(shipped, tmp_path):
    """P4"""
    run = copy_run(shipped[0], tmp_path / "run")
    assert cli("-q", "check", str(run), "--max-drop", "10", "--min-agreement", "0.85").code == 0
    assert read_manifest(run)["stages"]["check"]["data"]["count"] == 32  # < the default min_images, 100
    outcome = cli("-q", "package", str(run), "--target", shipped[2], "--out", str(tmp_path / "out"), "--json")
    assert outcome.code == 0, outcome
    assert "evidence_waived" not in json.loads(outcome.stdout)["parity"]


def test_min_images_applies_to_the_exports_own_check_too(shipped, tmp_path):
    """P5: an export checked on --data of 2 images is no better evidence than a check on them."""
    run = copy_run(shipped[0], tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["check"]["data"]["count"] = 20  # as if the export itself had used 20 images
    manifest["stages"]["export"]["parity_evidence"]["data"]["count"] = 20
    (run / "manifest.json").write_text(json.dumps(manifest))
    outcome = cli("package", str(run), "--target", small_target(tmp_path, min_images=25),
                  "--out", str(tmp_path / "out"))  # fmt: skip
    assert_one_error(outcome, 3, "rests on 20 images, rpi4-faults needs at least 25")


def _failing_check(run, monkeypatch, *extra: str) -> None:
    """``check`` with an int8 kernel that answers the wrong class (the next one): a real failed verdict
    through the real code path, recorded in the run's verdict history."""
    import numpy as np

    import edgetl.check.parity as parity

    real = parity.runner_for

    def wrong(path):
        runner = real(path)
        return (lambda images: np.roll(runner(images), 1, axis=1)) if path.name == "model_int8.tflite" else runner

    with monkeypatch.context() as patch:
        patch.setattr(parity, "runner_for", wrong)
        assert cli("-q", "check", str(run), *extra).code == 3


def _passing_check(run, *extra: str) -> int:
    outcome = cli("-q", "check", str(run), *extra)
    if outcome.code != 0 or read_manifest(run)["stages"]["check"]["passed"] is False:
        pytest.skip("the images of the later check happen to fail parity; P1 covers that refusal")
    return read_manifest(run)["stages"]["check"]["data"]["count"]


def test_a_waiver_cannot_overrule_a_failed_verdict_on_more_images(shipped, tmp_path, monkeypatch):
    """P6: the issue's case (exit 0 and 'passed: true' before)."""
    run = copy_run(shipped[0], tmp_path / "run")
    _failing_check(run, monkeypatch)
    assert _passing_check(run, "--data", str(_tiny(run, tmp_path))) == 2
    history = read_manifest(run)["parity_history"]
    assert [(h["data"]["count"], h["artifacts"]["model_int8.tflite"]["passed"]) for h in history][-2:] == [
        (32, False), (2, True)]  # fmt: skip
    page = (run / "report.html").read_text()  # the passing check re-wrote the report: the failure is on it
    shown = page[page.index("verdicts these model files have had"):].split("</details>")[0]
    assert shown.count("badge fail") >= 1 and shown.count("badge pass") >= 2
    outcome = cli("package", str(run), "--target", shipped[2], "--out", str(tmp_path / "out"), "--accept-weak-parity")
    assert_one_error(outcome, 3, "failed parity for rpi4-faults on 32 images of the val split", "agreement 0.00%",
                     "cannot overrule it")  # fmt: skip
    assert not (tmp_path / "out" / "run-rpi4-faults").exists()


def test_force_ships_it_and_says_what_failed(shipped, tmp_path, monkeypatch):
    """P7"""
    run = copy_run(shipped[0], tmp_path / "run")
    _failing_check(run, monkeypatch)
    _passing_check(run, "--data", str(_tiny(run, tmp_path)))
    outcome = cli("-q", "package", str(run), "--target", shipped[2], "--out", str(tmp_path / "out"), "--force")
    assert outcome.code == 0, outcome
    bundle = tmp_path / "out" / "run-rpi4-faults"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["forced"] is True and "rests on 2 images" in manifest["parity"]["evidence_waived"]
    [failure] = manifest["parity"]["failed_verdicts"]
    assert failure.startswith("32 images of the val split at ") and "agreement 0.00%" in failure
    ran = edgetl("run", str(bundle), str(shipped[3]))
    assert ran.code == 0 and f"WARNING: this model FAILED parity on {failure}" in ran.stderr, ran


def test_a_passing_check_on_more_images_stands_over_a_weaker_failure(shipped, tmp_path, monkeypatch):
    """P8"""
    run = copy_run(shipped[0], tmp_path / "run")
    _failing_check(run, monkeypatch, "--data", str(_tiny(run, tmp_path)))
    assert cli("-q", "check", str(run), "--max-drop", "10", "--min-agreement", "0.85").code == 0
    outcome = cli("-q", "package", str(run), "--target", shipped[2], "--out", str(tmp_path / "out"), "--json")
    assert outcome.code == 0, outcome
    assert "failed_verdicts" not in json.loads(outcome.stdout)["parity"]


@pytest.mark.parametrize("waiver", [[], ["--accept-weak-parity"]], ids=["plain", "waiver"])
def test_an_equal_failed_check_is_not_outvoted(shipped, tmp_path, monkeypatch, waiver):
    """P9"""
    run = copy_run(shipped[0], tmp_path / "run")
    _failing_check(run, monkeypatch)
    assert cli("-q", "check", str(run), "--max-drop", "10", "--min-agreement", "0.85").code == 0
    outcome = cli("package", str(run), "--target", shipped[2], "--out", str(tmp_path / "out"), *waiver)
    assert_one_error(outcome, 3, "on 32 images of the val split", "cannot overrule it")


def test_the_history_follows_the_bytes_not_the_stages(shipped):
    """A verdict is about the bytes it measured: a re-export that gives the same bytes (the stages dropped,
    the files the same) keeps them; one that gives other bytes starts a new history for that file."""
    from edgetl.check.metrics import ParityReport
    from edgetl.check.parity import verdict_history
    from edgetl.config import Thresholds

    manifest = read_manifest(shipped[0])
    old = manifest["parity_history"]
    int8 = manifest["files"]["model_int8.tflite"]["sha256"]
    assert old and all(h["artifacts"]["model_int8.tflite"]["sha256"] == int8 for h in old)
    metrics = {"passed": True, "top1": 1.0, "delta_top1_pp": 0.0, "agreement": 1.0}
    report = ParityReport(passed=True, thresholds=Thresholds(), data={"source": "val split", "count": 32},
                          float_metrics={}, artifacts={"model_int8.tflite": metrics})  # fmt: skip
    for stage in ("export", "check"):
        manifest["stages"].pop(stage)  # what a re-export does before it moves its files in
    assert verdict_history(manifest, report)[:-1] == old  # the same bytes: every verdict stands
    manifest["files"]["model_int8.tflite"]["sha256"] = "0" * 64  # exported again, other bytes
    history = verdict_history(manifest, report)
    assert len(history) == 1 + sum(bool(set(h["artifacts"]) - {"model_int8.tflite"}) for h in old)
    assert history[-1]["artifacts"]["model_int8.tflite"]["sha256"] == "0" * 64


# ----------------------------------------------------------------------------- bundles and the runtime


@pytest.fixture
def broken_bundle(shipped, tmp_path):
    """The bundle with its model cut in half and the manifest re-hashed to match."""
    bundle = tmp_path / "bundle"
    shutil.copytree(shipped[1], bundle)
    truncate(bundle / "model_int8.tflite")
    rehash(bundle, "model_int8.tflite")
    return bundle


def test_verify_catches_a_truncated_model_behind_a_rehashed_manifest(broken_bundle):
    """B1"""
    outcome = edgetl("verify", str(broken_bundle))
    assert_one_error(outcome, 6, "failed verification", "truncated or corrupt")


@pytest.mark.parametrize("how", ["edgetl", "device"], ids=["B2-edgetl-run", "B3-device-runtime"])
def test_running_a_truncated_model_is_an_error_not_a_crash(broken_bundle, shipped, how):
    if how == "edgetl":
        outcome = edgetl("run", str(broken_bundle), str(shipped[3]))
    else:  # the bundle's own copy of the runtime, as on the device
        proc = subprocess.run([sys.executable, "-m", "edgetl_runtime", ".", str(shipped[3])], cwd=broken_bundle,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        outcome = Outcome(proc.returncode, proc.stdout, proc.stderr)
    assert_one_error(outcome, 6, "truncated or corrupt")


@pytest.mark.parametrize(
    "content, command, code, words",
    [
        ("half", "run", 1, "truncated or corrupt"),
        ("half", "bench", 1, "truncated or corrupt"),
        ("empty", "run", 1, "is empty"),
        ("garbage", "run", 1, "not a TFLite model"),
    ],
    ids=["B4-truncated-run", "B5-truncated-bench", "B6-empty-run", "B7-garbage-run"],
)  # fmt: skip
def test_plain_models_that_are_not_whole(shipped, tmp_path, content, command, code, words):
    model = tmp_path / "model.tflite"
    data = (shipped[1] / "model_int8.tflite").read_bytes()
    model.write_bytes({"half": data[: len(data) // 2], "empty": b"", "garbage": b"\x89PNG" * 100}[content])
    extra = ["--runs", "3", "--threads", "1"] if command == "bench" else [str(shipped[3])]
    outcome = edgetl(command, str(model), "--labels", str(shipped[1] / "labels.txt"), *extra)
    assert_one_error(outcome, code, words)


@pytest.mark.parametrize("kind", ["truncated", "text"], ids=["B8-truncated-archive", "B9-not-an-archive"])
def test_verify_of_a_broken_archive_is_one_line(shipped, tmp_path, kind):
    archive = tmp_path / "bundle.tar.gz"
    source = shipped[1].parent / f"{shipped[1].name}.tar.gz"
    archive.write_bytes(source.read_bytes()[:2000] if kind == "truncated" else b"hello, not a tarball\n")
    outcome = edgetl("verify", str(archive))
    assert_one_error(outcome, 1, "not a readable bundle archive")
    assert "Aborted!" not in outcome.stderr


def test_verify_counts_labels_against_the_model(shipped, tmp_path):
    """B10"""
    bundle = tmp_path / "bundle"
    shutil.copytree(shipped[1], bundle)
    with open(bundle / "labels.txt", "a") as fh:
        fh.write("ghost\n")
    rehash(bundle, "labels.txt")
    assert_one_error(edgetl("verify", str(bundle)), 6, "labels.txt")


def test_json_error_object_from_the_runtime(broken_bundle, shipped):
    """B11"""
    outcome = edgetl("run", str(broken_bundle), str(shipped[3]), "--json")
    assert_one_error(outcome, 6)
    payload = json.loads(outcome.stdout)
    assert payload["ok"] is False and payload["error"]["exit_code"] == 6


@pytest.mark.parametrize("args", [["run", "{b}", "{img}", "--threads", "0"], ["bench", "{b}", "--runs", "0"]],
                         ids=["B12-threads-0", "B13-runs-0"])  # fmt: skip
def test_runtime_usage_errors(shipped, args):
    outcome = edgetl(*[a.format(b=shipped[1], img=shipped[3]) for a in args])
    assert_one_error(outcome, 2, "positive integer")


@pytest.mark.parametrize("command", ["package", "check"], ids=["B14-package", "B15-check"])
def test_a_truncated_artifact_in_a_rehashed_run(shipped, tmp_path, command):
    run = copy_run(shipped[0], tmp_path / "run")
    truncate(run / "model_int8.tflite")
    rehash(run, "model_int8.tflite")
    args = ["--target", shipped[2], "--out", str(tmp_path / "out")] if command == "package" else []
    outcome = edgetl(command, str(run), *args)
    assert_one_error(outcome, 1, "truncated or corrupt")
    assert not (tmp_path / "out" / "run-rpi4-faults").exists()


def test_package_into_a_read_only_folder(shipped, tmp_path):
    """B16"""
    with mounted_tmpfs(tmp_path / "ro", 64, read_only=True) as ro:
        outcome = cli("package", str(shipped[0]), "--target", shipped[2], "--out", str(ro))
        assert_one_error(outcome, 1, "read-only file system")


# ----------------------------------------------------------------------------- exports


def test_calibration_copy_of_a_validation_image_re_encoded(toy_run, tmp_path):
    """E1"""
    from PIL import Image

    from edgetl.data.folders import discover

    run = copy_run(toy_run[1], tmp_path / "run")
    first_val = discover(read_manifest(run)["stages"]["finetune"]["data"]["root"], 0.2, 0).val[0].path
    calib = tmp_path / "calib"
    calib.mkdir()
    Image.open(first_val).save(calib / "renamed.bmp")  # lossless: other bytes, same pixels
    assert (calib / "renamed.bmp").read_bytes() != first_val.read_bytes()
    outcome = cli("export", str(run), "--calib-dir", str(calib))
    assert_one_error(outcome, 1, "also in the parity set (same pixels)")
    assert "export" not in read_manifest(run)["stages"] and temporaries(run) == []


def test_killing_the_export_kills_its_converter(toy_run, tmp_path):
    """E2"""
    run = copy_run(toy_run[1], tmp_path / "run")
    proc = spawn("export", str(run), "--no-int8")

    def converter() -> list[int]:
        return [pid for pid in children(proc.pid) if "tflite_process" in _cmdline(pid)]

    wait_for(lambda: converter() or proc.poll() is not None, what="the converter process")
    orphans = converter()
    assert orphans, "the export ended before its converter could be seen"
    kill(proc)
    wait_for(lambda: not any(alive(pid) for pid in orphans), timeout=30, what="the converter to die with its parent")
    assert "export" not in read_manifest(run)["stages"] and not (run / "model.onnx").exists()
    rerun = edgetl("export", str(run), "--no-int8")
    assert rerun.code == 0, rerun
    assert (run / "model.onnx").is_file() and temporaries(run) == []
    foreign = [line for line in rerun.stderr.splitlines() if line.strip() and not line.startswith("edgetl: ")]
    assert foreign == [], rerun  # torch, onnx, TensorFlow and matplotlib chatter stays off stderr


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_ctrl_c_during_export_leaves_nothing_trusted(toy_run, tmp_path):
    """E3"""
    run = copy_run(toy_run[1], tmp_path / "run")
    proc = spawn("export", str(run), "--no-int8")
    wait_for(lambda: (run / ".export-work").exists() or proc.poll() is not None, what="the export's work folder")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert_one_error(Outcome(proc.returncode, stdout, stderr), 130, "interrupted")
    assert "export" not in read_manifest(run)["stages"] and temporaries(run) == []
    assert not any((run / name).exists() for name in ("model.onnx", "model_float32.tflite"))


def test_export_after_the_data_changed(toy_run, tmp_path):
    """E4"""
    root = tmp_path / "data"
    shutil.copytree(read_manifest(toy_run[1])["stages"]["finetune"]["data"]["root"], root)
    run = copy_run(toy_run[1], tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["finetune"]["data"]["root"] = str(root)
    (run / "manifest.json").write_text(json.dumps(manifest))
    next(root.glob("circle/*.png")).unlink()
    assert_one_error(cli("export", str(run), "--no-int8"), 1, "changed since fine-tuning")


def test_export_data_with_foreign_classes(toy_run, tmp_path):
    """E5"""
    (tmp_path / "other" / "giraffe").mkdir(parents=True)
    run = copy_run(toy_run[1], tmp_path / "run")
    assert_one_error(cli("export", str(run), "--no-int8", "--data", str(tmp_path / "other")), 1,
                     "not classes of this model")  # fmt: skip


def test_ctrl_c_that_an_extension_turns_into_another_error_is_still_exit_130():
    """E3b: SIGINT while a C extension initialises (seen in an export: "ImportError: initialization
    failed") is an interruption, not an internal error."""
    import os

    import click
    from click.testing import CliRunner

    from edgetl.cli.edge import EdgetlGroup

    @click.group(cls=EdgetlGroup)
    def group() -> None:
        pass

    @group.command()
    def load() -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)  # what an extension's init sees as KeyboardInterrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None

    result = CliRunner().invoke(group, ["load"])
    assert result.exit_code == 130 and "interrupted" in result.stderr and "internal error" not in result.stderr
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    from edgetl.errors import raise_if_interrupted

    raise_if_interrupted()  # and forgotten: the next command (or library call) in this process goes on
