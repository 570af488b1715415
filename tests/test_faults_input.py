"""Fault injection, part 1: options, datasets, training, run folders, locks and signals.

Every case asserts the exit code, exactly one ``edgetl: error:`` line on stderr and no traceback, and
that nothing half-written is left that a later step would trust. Part 2 (test_faults_artifacts.py)
covers parity evidence, exports, bundles and the device runtime.

| # | case | exit |
|---|---|---|
| O1-O9 | non-finite or out-of-range options: `--lr inf`, `--lr nan`, `--lr -1`, `--width 0`, | 2 |
|       | `--max-drop inf`, `--min-agreement 1.5`, `qat --lr inf`, `--val-fraction nan`, | |
|       | `--label-smoothing inf` | |
| O10 | unknown command | 2 |
| O11 | unknown target name | 2 |
| O12 | `--json` on a failure prints one `{"ok": false, "error": ...}` object on stdout | 1 |
| O13-O19 | an option the chosen `--strategy` ignores (`feature-extraction --unfreeze-from 5`, | 2 |
|       | `full --backbone-lr-mult 0.5`, `partial --layer-decay`, `auto --unfreeze-from`, ...) | |
| O20-O22 | `--threads` above 4 per CPU (at least 64): `benchmark`, `run`, `bench` | 2 |
| O23 | no option's help shows an unbounded range (`[x<=None]`) | - |
| D1 | class folder name with a newline | 1 |
| D2 | class folder name with a tab | 1 |
| D3 | class folder name with a Unicode line separator | 1 |
| D4 | identical train/ and val/ folders | 1 |
| D5 | val/ partly a copy of train/: trains, warns loudly, metrics.json counts it | 0 |
| D6 | `--out` inside the dataset | 2 |
| D7 | dataset folder missing | 1 |
| D8 | every image unreadable | 1 |
| D9 | an old run folder and a hidden `...` folder inside DATA, classes 猫/犬: both skipped and named, | 0 |
|    | every stderr line is edgetl's (no matplotlib glyph warnings) | |
| T1 | `--lr 1e30`: training diverges in epoch 1, nothing saved | 1 |
| T2 | loss turns non-finite in epoch 2: the epoch-1 checkpoint is kept, no model.pt | 1 |
| T1b | `--lr 1e9` (finite, loss ~1e20): training diverged, far above a guessing model's loss | 1 |
| T3 | 0-byte `model.pt`, then `export` | 1 |
| T4 | 0-byte `model.pt`, then `qat` | 1 |
| T5 | garbage `checkpoints/last.pt`, then `--resume` | 1 |
| S1 | SIGINT during finetune (real signal): "N of M epochs saved" matches the checkpoint; resume finishes | 130, 0 |
| S2 | SIGKILL during finetune with a 0-byte `.last.pt.*.tmp` left: resume removes it and finishes | -9, 0 |
| L1 | finetune `--resume` while another process holds the run | 1 |
| L2 | export while another process holds the run | 1 |
| L3 | check while another process holds the run | 1 |
| L4 | the lock of a SIGKILLed holder is free at once | 0 |
| R1 | finetune into a read-only folder | 1 |
| R2 | export of a run on a read-only file system | 1 |
| R3 | check of a run on a read-only file system | 1 |
| F1 | finetune on a full disk: the error names the file, no model, no temporary files | 1 |
| F2 | export on a full disk: the error names the folder, no artifact, no work folder, manifest untouched | 1 |
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import pytest
import torch
from conftest import TOY_CLASSES, copy_run
from faults import (
    Outcome,
    assert_one_error,
    cli,
    edgetl,
    hold_lock,
    kill,
    mounted_tmpfs,
    spawn,
    temporaries,
    wait_for,
)

from edgetl.rundir import read_manifest

pytestmark = pytest.mark.slow

TOY = ["--width", "0.35", "--image-size", "32", "--head-epochs", "1", "--finetune-epochs", "1",
       "--batch-size", "16", "--weights", "none"]  # fmt: skip


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "args, words",
    [
        (["finetune", "{data}", "--out", "{tmp}/r", "--lr", "inf"], "'--lr': 'inf' is not a finite number"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--lr", "nan"], "'--lr': 'nan' is not a finite number"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--lr", "-1"], "--lr"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--width", "0"], "--width"),
        (["export", "{tmp}", "--max-drop", "inf"], "'--max-drop': 'inf' is not a finite number"),
        (["check", "{tmp}", "--min-agreement", "1.5"], "--min-agreement"),
        (["qat", "{tmp}", "--out", "{tmp}/q", "--lr", "inf"], "'--lr': 'inf' is not a finite number"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--val-fraction", "nan"], "--val-fraction"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--label-smoothing", "inf"], "--label-smoothing"),
        (["frobnicate"], "No such command"),
        (["package", "{tmp}", "--target", "rpi9"], "unknown target 'rpi9'"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--strategy", "feature-extraction", "--unfreeze-from", "5"],
         "--unfreeze-from applies to --strategy partial; with --strategy feature-extraction it would be ignored"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--strategy", "full", "--backbone-lr-mult", "0.5"],
         "--backbone-lr-mult applies to --strategy partial; with --strategy full"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--strategy", "partial", "--layer-decay", "0.8"],
         "--layer-decay applies to --strategy full; with --strategy partial"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--strategy", "auto", "--unfreeze-from", "3"],
         "--unfreeze-from applies to --strategy partial; with --strategy auto"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--strategy", "full", "--probe-epochs", "2"],
         "--probe-epochs applies to --strategy auto"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--unfreeze-from", "3", "--unfreeze-epochs", "2"],
         "--unfreeze-epochs applies to --strategy full; with --strategy partial"),
        (["finetune", "{data}", "--out", "{tmp}/r", "--strategy", "feature-extraction", "--unfreeze-epochs", "2"],
         "--unfreeze-epochs applies"),
        (["benchmark", "{tmp}", "--threads", "1,100000"], "Invalid value for '--threads': 100000 is more than"),
        (["run", "{tmp}", "--threads", "100000"], "--threads 100000 is more than"),
        (["bench", "{tmp}", "--threads", "2,100000"], "--threads 100000 is more than"),
    ],
    ids=["O1-lr-inf", "O2-lr-nan", "O3-lr-negative", "O4-width-0", "O5-max-drop-inf", "O6-min-agreement-1.5",
         "O7-qat-lr-inf", "O8-val-fraction-nan", "O9-label-smoothing-inf", "O10-unknown-command",
         "O11-unknown-target", "O13-fe-unfreeze-from", "O14-full-backbone-lr-mult", "O15-partial-layer-decay",
         "O16-auto-unfreeze-from", "O17-full-probe-epochs", "O18-implied-partial-unfreeze-epochs",
         "O19-fe-unfreeze-epochs", "O20-benchmark-threads", "O21-run-threads", "O22-bench-threads"],
)  # fmt: skip
def test_bad_options_are_usage_errors(toy_data, tmp_path, args, words):
    outcome = cli(*[a.format(data=toy_data, tmp=tmp_path) for a in args])
    assert_one_error(outcome, 2, words)
    assert not (tmp_path / "r").exists() and not (tmp_path / "q").exists()


def test_no_option_help_shows_an_unbounded_range():
    """O23: click prints a FloatRange without bounds as ``[x<=None]``."""
    import click

    from edgetl.cli import main

    def commands(group, prefix=()):
        for name, command in group.commands.items():
            yield (*prefix, name), command
            if isinstance(command, click.Group):
                yield from commands(command, (*prefix, name))

    found = list(commands(main))
    assert len(found) > 15
    for path, _ in found:
        text = cli(*path, "--help").stdout
        assert not re.search(r"\[[^\]]*None[^\]]*\]", text), (path, text)


def test_json_failure_is_one_error_object_on_stdout(tmp_path):
    """O12"""
    outcome = cli("finetune", str(tmp_path / "none"), "--out", str(tmp_path / "r"), "--json")
    assert_one_error(outcome, 1, "does not exist")
    payload = json.loads(outcome.stdout)
    assert payload["ok"] is False and payload["error"]["exit_code"] == 1
    assert "does not exist" in payload["error"]["message"]


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", ["bad\nname", "bad\tname", "bad\u2028name"], ids=["D1-newline", "D2-tab", "D3-U2028"])
def test_class_names_with_control_characters_are_refused(toy_data, tmp_path, name):
    data = tmp_path / "data"
    shutil.copytree(toy_data, data, ignore=shutil.ignore_patterns("test"))
    (data / "circle").rename(data / name)
    line = assert_one_error(cli("finetune", str(data), "--out", str(tmp_path / "r"), *TOY), 1, "control character")
    assert "\n" not in line and "\t" not in line  # shown escaped: still one line
    assert not (tmp_path / "r" / "labels.txt").exists()


def _split_dataset(toy_data, root, val_from_train: int | None):
    """train/ from the toy data; val/ a copy of train/ (``None``) or ``val_from_train`` copied images
    per class plus the toy test images."""
    for name in TOY_CLASSES:
        shutil.copytree(toy_data / name, root / "train" / name)
        if val_from_train is None:
            shutil.copytree(toy_data / name, root / "val" / name)
        else:
            shutil.copytree(toy_data / "test" / name, root / "val" / name)
            for image in sorted((toy_data / name).iterdir())[:val_from_train]:
                shutil.copy(image, root / "val" / name / f"copy-{image.name}")
    return root


def test_identical_train_and_val_are_refused(toy_data, tmp_path):
    """D4"""
    data = _split_dataset(toy_data, tmp_path / "data", None)
    assert_one_error(cli("finetune", str(data), "--out", str(tmp_path / "r"), *TOY), 1,
                     "all 48 validation images are also training images")  # fmt: skip
    assert not (tmp_path / "r" / "model.pt").exists()


def test_val_partly_in_train_warns_and_is_recorded(toy_data, tmp_path):
    """D5"""
    data = _split_dataset(toy_data, tmp_path / "data", 1)
    outcome = cli("finetune", str(data), "--out", str(tmp_path / "r"), *TOY)
    assert outcome.code == 0, outcome
    assert "3 of 15 val images are ALSO TRAINING IMAGES" in outcome.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["counts"]["val_in_train"] == 3


def test_out_inside_the_dataset_is_refused(toy_data, tmp_path):
    """D6"""
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    before = sorted(p.name for p in data.iterdir())
    assert_one_error(cli("finetune", str(data), "--out", str(data / "runs" / "r"), *TOY), 2, "inside the dataset")
    assert sorted(p.name for p in data.iterdir()) == before


def test_run_folders_and_hidden_folders_inside_the_data_are_skipped_and_named(toy_data, toy_run, tmp_path):
    """D9: an old run copied into DATA was a class (its charts the images); `...` was skipped unnamed;
    class names in a script matplotlib's font lacks put "Glyph missing" warnings on stderr."""
    data = tmp_path / "data"
    for name, new in zip(TOY_CLASSES[:2], ("猫", "犬"), strict=True):
        shutil.copytree(toy_data / name, data / new)
    shutil.copytree(toy_run[1], data / "old-run", ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(toy_data / TOY_CLASSES[2], data / "...")
    outcome = edgetl("finetune", str(data), "--out", str(tmp_path / "r"), *TOY)
    assert outcome.code == 0, outcome
    assert (tmp_path / "r" / "labels.txt").read_text(encoding="utf-8").split() == ["犬", "猫"]
    assert f"skipping folder {data / 'old-run'} (an edgetl run or bundle folder)" in outcome.stderr
    assert f"skipping folder {data / '...'} (hidden)" in outcome.stderr
    foreign = [line for line in outcome.stderr.splitlines() if line.strip() and not line.startswith("edgetl: ")]
    assert foreign == [], outcome


def test_missing_and_unreadable_datasets(tmp_path):
    """D7, D8"""
    assert_one_error(cli("finetune", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), *TOY), 1, "does not exist")
    for name in ("a", "b"):
        (tmp_path / "junk" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "junk" / name / f"{i}.jpg").write_bytes(b"not a jpeg")
    assert_one_error(cli("finetune", str(tmp_path / "junk"), "--out", str(tmp_path / "r2"), *TOY), 1,
                     "could be decoded")  # fmt: skip
    assert not (tmp_path / "r2" / "model.pt").exists()


# ----------------------------------------------------------------------------- training


def test_diverging_training_stops_with_nothing_saved(toy_data, tmp_path):
    """T1"""
    run = tmp_path / "r"
    assert_one_error(cli("finetune", str(toy_data), "--out", str(run), *TOY, "--lr", "1e30"), 1,
                     "training diverged in epoch 1", "nothing was saved")  # fmt: skip
    assert not (run / "model.pt").exists() and not (run / "checkpoints" / "last.pt").exists()
    assert temporaries(run) == []


def test_a_finite_but_exploding_loss_is_divergence_too(toy_data, tmp_path):
    """T1b: the issue's case: --lr 1e9 ended with exit 0 and a validation loss of 1e21."""
    run = tmp_path / "r"
    line = assert_one_error(cli("finetune", str(toy_data), "--out", str(run), *TOY, "--lr", "1e9"), 1,
                            "training diverged in epoch 1", "a model that guesses scores 1.1")  # fmt: skip
    assert "inf" not in line.split("(")[1].split(";")[0]  # finite: caught by the size of the loss, not by NaN
    assert not (run / "model.pt").exists()


def test_divergence_in_epoch_2_keeps_the_epoch_1_checkpoint(toy_data, tmp_path, monkeypatch):
    """T2"""
    import edgetl.train.finetune as train_module

    real = train_module.train_one_epoch
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        stats = real(*args, **kwargs)
        return {**stats, "train_loss": float("nan")} if calls["n"] == 2 else stats

    monkeypatch.setattr(train_module, "train_one_epoch", poisoned)
    run = tmp_path / "r"
    assert_one_error(cli("finetune", str(toy_data), "--out", str(run), *TOY), 1,
                     "diverged in epoch 2", "last good state (epoch 1)")  # fmt: skip
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["next_epoch"] == 1 and not (run / "model.pt").exists()


@pytest.mark.parametrize("command", ["export", "qat"], ids=["T3-export", "T4-qat"])
def test_empty_model_checkpoint_is_one_line(toy_run, tmp_path, command):
    run = copy_run(toy_run[1], tmp_path / "run")
    (run / "model.pt").write_bytes(b"")
    extra = ["--out", str(tmp_path / "qat")] if command == "qat" else ["--no-int8"]
    assert_one_error(cli(command, str(run), *extra), 1, "model.pt")
    assert "export" not in read_manifest(run)["stages"] and not (tmp_path / "qat" / "model.pt").exists()


def test_garbage_training_state_cannot_be_resumed(toy_data, tmp_path):
    """T5"""
    state = tmp_path / "r" / "checkpoints" / "last.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"\x00garbage")
    assert_one_error(cli("finetune", str(toy_data), "--out", str(tmp_path / "r"), "--resume"), 1, "cannot read")


# ----------------------------------------------------------------------------- signals


def _state_epochs(run) -> int:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["next_epoch"]


def _slow_toy(toy_data, run) -> list[str]:
    return ["finetune", str(toy_data), "--out", str(run), "--width", "0.35", "--image-size", "32",
            "--head-epochs", "3", "--finetune-epochs", "3", "--batch-size", "4", "--weights", "none",
            "--patience", "0"]  # fmt: skip


def test_sigint_during_finetune_says_what_is_saved_and_resumes(toy_data, tmp_path):
    """S1"""
    run = tmp_path / "r"
    proc = spawn(*_slow_toy(toy_data, run))
    wait_for(lambda: (run / "checkpoints" / "last.pt").exists(), what="the first checkpoint")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    saved = _state_epochs(run)
    assert_one_error(Outcome(proc.returncode, stdout, stderr), 130, f"{saved} of 6 epochs are saved")
    assert f"continue at epoch {saved + 1}" in stderr
    assert temporaries(run) == [] and not (run / "model.pt").exists()
    resumed = edgetl(*_slow_toy(toy_data, run), "--resume")
    assert resumed.code == 0, resumed
    assert len(json.loads((run / "metrics.json").read_text())["counts"]) and (run / "model.pt").is_file()


def test_sigkill_during_finetune_then_resume_cleans_up(toy_data, tmp_path):
    """S2"""
    run = tmp_path / "r"
    proc = spawn(*_slow_toy(toy_data, run))
    wait_for(lambda: (run / "checkpoints" / "last.pt").exists(), what="the first checkpoint")
    kill(proc)
    assert proc.returncode == -signal.SIGKILL
    stale = run / "checkpoints" / ".last.pt.deadbeef.tmp"  # what a kill inside torch.save leaves
    stale.write_bytes(b"")
    resumed = edgetl(*_slow_toy(toy_data, run), "--resume")
    assert resumed.code == 0, resumed
    assert temporaries(run) == [] and (run / "model.pt").is_file()
    assert len((run / "history.csv").read_text().splitlines()) == 1 + 6


# ----------------------------------------------------------------------------- locks


@pytest.mark.parametrize("command", ["finetune", "export", "check"], ids=["L1-finetune", "L2-export", "L3-check"])
def test_a_held_run_is_refused(toy_run, toy_data, tmp_path, command):
    run = copy_run(toy_run[1], tmp_path / "run")
    before = (run / "manifest.json").read_bytes()
    holder = hold_lock(run, "export")
    try:
        args = {"finetune": ["finetune", str(toy_data), "--out", str(run), "--resume"],
                "export": ["export", str(run), "--no-int8"], "check": ["check", str(run)]}[command]  # fmt: skip
        assert_one_error(cli(*args), 1, "is in use by edgetl export (pid")
    finally:
        kill(holder)
    assert (run / "manifest.json").read_bytes() == before


def test_the_lock_of_a_killed_holder_is_free(toy_run, tmp_path):
    """L4"""
    from edgetl.rundir import run_lock

    run = copy_run(toy_run[1], tmp_path / "run")
    kill(hold_lock(run))
    with run_lock(run, "test"):
        assert "edgetl test" in (run / ".edgetl.lock").read_text()


# ----------------------------------------------------------------------------- read-only and full disks


def test_finetune_into_a_read_only_folder(toy_data, tmp_path):
    """R1"""
    with mounted_tmpfs(tmp_path / "ro", 1024, read_only=True) as ro:
        assert_one_error(cli("finetune", str(toy_data), "--out", str(ro / "r"), *TOY), 1, "read-only file system")


@pytest.mark.parametrize("command", ["export", "check"], ids=["R2-export", "R3-check"])
def test_read_only_run(toy_run, tmp_path, command):
    run = copy_run(toy_run[1], tmp_path / "run")
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) // 1024 + 512
    with mounted_tmpfs(tmp_path / "ro", size, fill_from=run, read_only=True) as ro:
        args = ["export", str(ro), "--no-int8"] if command == "export" else ["check", str(ro)]
        assert_one_error(cli(*args), 1, "read-only file system")


def test_finetune_on_a_full_disk(toy_data, tmp_path):
    """F1"""
    with mounted_tmpfs(tmp_path / "full", 256) as full:
        run = full / "r"
        assert_one_error(cli("finetune", str(toy_data), "--out", str(run), *TOY), 1,
                         f"no space left on device: {run}/")  # fmt: skip
        assert not (run / "model.pt").exists() and temporaries(run) == []


def test_export_on_a_full_disk(toy_run, tmp_path):
    """F2"""
    run = copy_run(toy_run[1], tmp_path / "run")
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) // 1024 + 300
    with mounted_tmpfs(tmp_path / "full", size, fill_from=run) as full:
        manifest = (full / "manifest.json").read_bytes()
        assert_one_error(cli("export", str(full), "--no-int8"), 1, f"no space left on device: {full}/")
        assert (full / "manifest.json").read_bytes() == manifest
        assert not (full / "model.onnx").exists() and temporaries(full) == []
    assert os.path.isdir(tmp_path / "full")
