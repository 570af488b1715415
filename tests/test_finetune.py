"""The fine-tuning run end to end: artifacts, manifest, accuracy, resume, CLI behaviour."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TOY_CLASSES, TOY_CONFIG, interrupt_toy_run

from edgetl.cli import main
from edgetl.config import FinetuneConfig
from edgetl.errors import ConfigError, RunDirError
from edgetl.rundir import read_manifest, verify_files
from edgetl.train import finetune as train_module
from edgetl.train.checkpoint import STATE_PATH, load_checkpoint
from edgetl.train.finetune import finetune
from edgetl.train.loop import predict_logits

pytestmark = pytest.mark.slow
RUN_FILES = {"model.pt", "labels.txt", "history.csv", "metrics.json", "training.png", "confusion.png"}


def test_run_directory_has_every_artifact_hashed_in_the_manifest(toy_run):
    result, run_dir = toy_run
    manifest = read_manifest(run_dir)
    assert set(manifest["files"]) == RUN_FILES
    assert verify_files(run_dir, manifest) == []
    stage = manifest["stages"]["finetune"]
    assert stage["labels"] == list(TOY_CLASSES)
    assert stage["preprocess"]["image_size"] == 32 and stage["preprocess"]["resize_size"] == 37
    assert stage["config"]["width"] == 0.35
    assert (run_dir / "labels.txt").read_text().split() == list(TOY_CLASSES)
    for png in ("training.png", "confusion.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_history_has_one_row_per_epoch_with_phases_and_lrs(toy_run):
    _, run_dir = toy_run
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [r["phase"] for r in rows] == ["1", "1", "2", "2"]
    assert all(r["lr_backbone"] == "" for r in rows[:2])
    used = json.loads((run_dir / "metrics.json").read_text())["strategy"]["used"]  # the default: auto's choice
    if used == "feature-extraction":
        assert all(r["lr_backbone"] == "" for r in rows[2:])
    else:
        assert all(float(r["lr_backbone"]) < float(r["lr_head"]) for r in rows[2:])
    assert all(float(r["images_per_s"]) > 0 for r in rows)


def test_metrics_report_val_and_test_separately(toy_run):
    result, run_dir = toy_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["counts"] == {"train": 39, "val": 9, "test": 12, "skipped": 0, "val_in_train": 0, "test_in_train": 0}
    assert metrics["val"]["count"] == 9 and metrics["test"]["count"] == 12
    assert len(metrics["val"]["confusion_matrix"]) == 3
    assert sum(map(sum, metrics["val"]["confusion_matrix"])) == 9
    assert metrics["val"]["top1"] == result.best_val_acc
    assert metrics["test"]["top1"] == result.test_acc


def test_checkpoint_reloads_to_the_reported_accuracy(toy_run, toy_data):
    result, run_dir = toy_run
    model, checkpoint = load_checkpoint(run_dir)
    assert checkpoint["labels"] == list(TOY_CLASSES)
    from edgetl.data.cache import load_split
    from edgetl.data.folders import discover
    from edgetl.runtime.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(checkpoint["preprocess"])
    splits = discover(toy_data, seed=0)
    val = load_split(splits.val, spec.resize_size, spec, eval_crop=True)
    logits = predict_logits(model, val.images, torch.device("cpu"))
    assert (logits.argmax(1) == val.labels).mean() == pytest.approx(result.best_val_acc)


def test_learns_well_above_chance(learned_run):
    result, run_dir = learned_run
    chance = 1 / 4
    assert result.best_val_acc >= 0.75 >= 3 * chance
    assert result.test_acc >= 0.7
    assert result.phase1_val_acc >= 0.5  # the head alone already learns on a pretrained backbone


def test_interrupted_run_resumes_to_the_same_model(toy_run, toy_data, tmp_path, monkeypatch):
    uninterrupted, reference_dir = toy_run
    run_dir = tmp_path / "run"
    interrupt_toy_run(monkeypatch, toy_data, run_dir)
    assert (run_dir / STATE_PATH).is_file()
    assert not (run_dir / "model.pt").exists()  # nothing a later step would trust

    resumed = finetune(toy_data, run_dir, FinetuneConfig(), resume=True, overrides={})
    assert resumed.epochs_run == uninterrupted.epochs_run == 4
    ours = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    reference = torch.load(reference_dir / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert (run_dir / "history.csv").read_text().count("\n") == 5
    cache = json.loads((run_dir / "metrics.json").read_text())["data"]["cache"]
    assert all(entry["reused"] for entry in cache.values())  # the resume decoded nothing


def test_existing_run_is_never_overwritten(toy_run, toy_data):
    _, run_dir = toy_run
    before = (run_dir / "model.pt").read_bytes()
    with pytest.raises(RunDirError, match="already holds"):
        finetune(toy_data, run_dir, FinetuneConfig.build(TOY_CONFIG))
    assert (run_dir / "model.pt").read_bytes() == before


def test_resume_rejects_changed_settings_and_missing_state(toy_run, toy_data, tmp_path):
    _, run_dir = toy_run
    with pytest.raises(ConfigError, match="stored settings"):
        finetune(toy_data, run_dir, FinetuneConfig(), resume=True, overrides={"width": 1.0})
    with pytest.raises(RunDirError, match="nothing to resume"):
        finetune(toy_data, tmp_path / "new", FinetuneConfig(), resume=True)


# ----------------------------------------------------------------------------- CLI


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def toy_flags() -> list[str]:
    return ["--width", "0.35", "--image-size", "32", "--head-epochs", "1", "--finetune-epochs", "1",
            "--batch-size", "16", "--weights", "none"]  # fmt: skip


def test_cli_json_result(toy_data, tmp_path):
    result = cli("-q", "finetune", str(toy_data), "--out", str(tmp_path / "r"), *toy_flags(), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["classes"] == list(TOY_CLASSES) and payload["epochs_run"] == 2
    assert (tmp_path / "r" / "manifest.json").is_file()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["finetune", "/no/such/dir", "--out", "{tmp}/r"], 1, "does not exist"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--image-size", "30"], 2, "multiple of 8"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--weights", "/no/weights.pth"], 1, "does not exist"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--weights", "imagenet"], 1, "--weights none"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--resume"], 1, "nothing to resume"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--head-epochs", "0", "--finetune-epochs", "0"],
         2, "nothing to train"),
    ],
    ids=["missing-data", "bad-size", "missing-weights", "imagenet-offline", "resume-nothing", "no-epochs"],
)
def test_cli_errors_are_one_line_with_exit_codes(toy_data, tmp_path, args, code, message):
    args = [a.format(tmp=tmp_path, data=toy_data) for a in args]
    result = cli(*args)
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("edgetl: error:"), result.stderr
    assert message in errors[0]
    assert "Traceback" not in result.output


def test_cli_ctrl_c_exits_130_and_says_how_to_resume(toy_data, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    result = cli("finetune", str(toy_data), "--out", str(tmp_path / "r"), *toy_flags())
    assert result.exit_code == 130
    assert "before the first epoch ended; nothing was saved" in result.stderr


def test_weights_default_comes_from_the_environment(toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_WEIGHTS", str(tmp_path / "from-env.pth"))
    flags = [f for f in toy_flags() if f not in ("--weights", "none")]
    result = cli("finetune", str(toy_data), "--out", str(tmp_path / "r"), *flags)
    assert result.exit_code == 1
    assert "from-env.pth does not exist" in result.stderr


def test_demo_says_loudly_when_it_trains_from_scratch(tmp_path, monkeypatch):
    from edgetl import demo

    monkeypatch.setattr(demo, "DEMO_DATA", {"per_class": 8, "test_per_class": 2, "size": 40})
    monkeypatch.setattr(demo, "DEMO_CONFIG", {**TOY_CONFIG, "head_epochs": 1, "finetune_epochs": 1})
    result = cli("demo", "--out", str(tmp_path / "demo"), "--no-export", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["weights"] == "none"
    assert any("TRAINING FROM SCRATCH" in note for note in payload["notes"])
    assert "TRAINING FROM SCRATCH" in result.stderr
    assert (tmp_path / "demo" / "run" / "model.pt").is_file()
    assert payload["finetune"]["test_acc"] is not None
    assert "export skipped (--no-export)" in payload["notes"]


def test_demo_end_to_end_with_a_relative_output_folder(tmp_path, monkeypatch, netguard_log):
    """finetune -> export -> check -> package -> the bundle's own runtime, as `make demo` runs it."""
    pytest.importorskip("onnx2tf", reason="needs the export extra")
    from edgetl import demo
    from edgetl.targets import load_target

    target = tmp_path / "toy32.toml"
    text = open(load_target("rpi4-cpu-96").source).read().replace("size = 96", "size = 32")
    text = text.replace("max_drop = 1.0", "max_drop = 100.0")  # a random-init toy model: the gate is not
    target.write_text(text.replace("min_agreement = 0.98", "min_agreement = 0"))  # what this test is about
    monkeypatch.setattr(demo, "DEMO_TARGET", str(target))
    monkeypatch.setattr(demo, "DEMO_DATA", {"per_class": 8, "test_per_class": 2, "size": 40})
    monkeypatch.setattr(demo, "DEMO_CONFIG", {**TOY_CONFIG, "head_epochs": 1, "finetune_epochs": 1})
    monkeypatch.chdir(tmp_path)
    result = cli("-q", "demo", "--out", "demo", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["bundle"]["archive"].endswith(".tar.gz")
    assert len(payload["predictions"]) == 5 and all(p["label"] in payload["finetune"]["classes"]
                                                    for p in payload["predictions"])  # fmt: skip
