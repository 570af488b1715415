"""Atomic writes (also under SIGKILL), the manifest, configuration and the generated dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from edgetl.config import FinetuneConfig
from edgetl.data import synthetic as synth
from edgetl.errors import ConfigError, RunDirError
from edgetl.rundir import (
    MANIFEST_NAME,
    atomic_path,
    atomic_write,
    read_manifest,
    update_manifest,
    verify_files,
)


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, "first")
    atomic_write(target, b"second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]  # no temp files left
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_sigkill_mid_write_leaves_no_trusted_half_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"previous complete artifact")
    code = textwrap.dedent(
        f"""
        import os, signal
        from edgetl.rundir import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"x" * 1_000_000)
                fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous complete artifact"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "model.bin"]
    assert all(name.startswith(".model.bin.") and name.endswith(".tmp") for name in leftovers)


def test_manifest_records_hashes_and_detects_changes(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    manifest = update_manifest(tmp_path, "stage1", ["a.txt"], {"k": 1})
    assert manifest["schema_version"] == 1
    assert manifest["files"]["a.txt"]["size"] == 5
    on_disk = (tmp_path / MANIFEST_NAME).read_text()
    assert on_disk == json.dumps(json.loads(on_disk), indent=2, sort_keys=True) + "\n"
    assert verify_files(tmp_path, read_manifest(tmp_path)) == []
    (tmp_path / "a.txt").write_text("alphA")
    assert verify_files(tmp_path, read_manifest(tmp_path)) == ["a.txt"]
    os.remove(tmp_path / "a.txt")
    assert verify_files(tmp_path, read_manifest(tmp_path)) == ["a.txt"]


def test_manifest_of_another_schema_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(RunDirError, match="schema_version 99"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(RunDirError, match="cannot read"):
        read_manifest(tmp_path)


# ----------------------------------------------------------------------------- configuration


def test_precedence_is_defaults_then_layers_and_none_does_not_override():
    cfg = FinetuneConfig.build({"image_size": 160, "lr": 0.01}, {"image_size": 96, "lr": None})
    assert cfg.image_size == 96 and cfg.lr == 0.01 and cfg.width == 1.0
    assert cfg.phase2_head_lr == pytest.approx(0.001)


def test_unknown_keys_suggest_the_closest():
    with pytest.raises(ConfigError) as info:
        FinetuneConfig.build({"head_epoch": 3})
    assert info.value.hint == "did you mean 'head_epochs'?"


@pytest.mark.parametrize(
    "override",
    [{"width": 0}, {"image_size": 30}, {"bn": "sometimes"}, {"val_fraction": 1.0},
     {"label_smoothing": 1.5}, {"head_epochs": -1}, {"lr": 0}, {"device": "tpu"}],  # fmt: skip
)
def test_bad_values_are_config_errors(override):
    with pytest.raises(ConfigError, match="invalid"):
        FinetuneConfig.build(override)


# ----------------------------------------------------------------------------- generated data


def test_generated_dataset_is_deterministic_and_complete(tmp_path):
    first = synth.generate(tmp_path / "a", classes=("circle", "star"), per_class=3, size=32, seed=5)
    second = synth.generate(tmp_path / "b", classes=("circle", "star"), per_class=3, size=32, seed=5)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == 6
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    other = synth.generate(tmp_path / "c", classes=("circle", "star"), per_class=3, size=32, seed=6)
    assert (other / files[0]).read_bytes() != (first / files[0]).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_generated_images_vary_within_a_class(tmp_path):
    import numpy as np
    from PIL import Image

    root = synth.generate(tmp_path / "d", classes=("square", "ring"), per_class=4, size=48, seed=0)
    images = [np.asarray(Image.open(p), np.float32) for p in sorted((root / "square").glob("*.png"))]
    assert min(np.abs(a - b).mean() for a, b in zip(images, images[1:], strict=False)) > 10
