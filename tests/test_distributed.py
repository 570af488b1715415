"""Data-parallel fine-tuning (DDP, gloo on CPU) through ``edgetl finetune --nproc 2``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import interrupt_toy_run

from edgetl.cli.edge import without_option
from edgetl.data.cache import entries
from edgetl.rundir import read_manifest, verify_files
from edgetl.train.checkpoint import STATE_PATH


def test_nproc_is_removed_from_the_relaunched_command():
    argv = ["-q", "finetune", "d", "--nproc", "2", "--out", "r", "--nproc=3", "--json"]
    assert without_option(argv, "--nproc") == ["-q", "finetune", "d", "--out", "r", "--json"]


def test_two_processes_resume_a_run_and_only_rank_0_writes(toy_data, tmp_path, monkeypatch):
    """A single-process run interrupted after 2 of 4 epochs is finished by 2 DDP processes."""
    run_dir = tmp_path / "run"
    interrupt_toy_run(monkeypatch, toy_data, run_dir)
    before = torch.load(run_dir / STATE_PATH, weights_only=False)["model"]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cache = tmp_path / "fresh-cache"  # the ranks build it: one builds each entry, the other maps it
    proc = subprocess.run(
        [sys.executable, "-m", "edgetl", "finetune", str(toy_data), "--out", str(run_dir), "--resume",
         "--nproc", "2", "--device", "cpu", "--cache-dir", str(cache), "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(e["mode"] for e in entries(cache)) == ["eval", "eval", "train"]  # no duplicate, no leftover
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout  # one report, from rank 0
    result = json.loads(lines[0])
    assert result["processes"] == 2 and result["epochs_run"] == 4
    assert "data-parallel on 2 processes (gloo)" in proc.stderr
    history = (run_dir / "history.csv").read_text().strip().splitlines()
    assert len(history) == 5 and history[3].startswith("3,2,")  # header + 4 epochs; epoch 3 is phase 2
    manifest = read_manifest(run_dir)
    assert verify_files(run_dir, manifest) == []
    after = torch.load(run_dir / STATE_PATH, weights_only=False)["model"]
    trained = [k for k in after if k.startswith("net.classifier") and not torch.equal(after[k], before[k])]
    assert trained, "the DDP epochs did not change the head"
