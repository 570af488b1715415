"""The decoded-image cache (edgetl.data.cache), training from it (edgetl.train.batches) and the faster
JPEG decode: reuse, invalidation, killed builders, two processes on one entry, a full disk, the CLI."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TOY_CONFIG
from PIL import Image

from edgetl.config import FinetuneConfig
from edgetl.data import cache
from edgetl.data.cache import entries, load_split
from edgetl.data.decode import decode_image, decode_sample
from edgetl.data.folders import discover
from edgetl.errors import DataError
from edgetl.runtime.preprocess import PreprocessSpec, prepare
from edgetl.train.batches import Resident, Streamed, gpu_placement, place
from edgetl.train.loop import train_one_epoch
from edgetl.train.model import EdgeClassifier

SPEC = PreprocessSpec.for_size(32)


@pytest.fixture
def data(toy_data, tmp_path) -> Path:
    """A private copy of the toy dataset (tests here change files)."""
    return Path(shutil.copytree(toy_data, tmp_path / "data"))


def train_split(data: Path, root: Path, **kwargs):
    return load_split(discover(data).train, SPEC.resize_size, SPEC, eval_crop=False, root=root, **kwargs)


def test_second_load_maps_the_first_ones_entry(data, tmp_path):
    first = train_split(data, tmp_path / "c")
    second = train_split(data, tmp_path / "c")
    assert first.cache["reused"] is False and second.cache["reused"] is True
    assert second.cache["entry"] == first.cache["entry"]
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(first.images, second.images) and first.digests == second.digests
    samples = discover(data).train
    expected = np.stack([decode_sample(s.path, SPEC.resize_size, SPEC, False)[0] for s in samples])
    assert np.array_equal(second.images, expected)  # the cache holds exactly what decoding gives
    assert [e["state"] for e in entries(tmp_path / "c")] == ["ok"]


def test_an_entry_names_files_as_each_caller_does(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data.parent)
    relative = load_split(discover("data").train, SPEC.resize_size, SPEC, eval_crop=False, root=tmp_path / "c")
    assert relative.paths[0].startswith("data/")
    monkeypatch.chdir(tmp_path / "c")  # another process, another working folder, the same files
    absolute = train_split(data, tmp_path / "c")
    assert absolute.cache["reused"] is True and absolute.cache["entry"] == relative.cache["entry"]
    assert absolute.paths == [str(data.parent / p) for p in relative.paths]


def test_the_toy_run_records_its_cache_entries(toy_run):
    _, run_dir = toy_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = metrics["data"]
    assert set(record["cache"]) == {"train", "val", "test"}
    assert all(Path(item["entry"]).is_dir() for item in record["cache"].values())
    assert record["cache"]["train"]["bytes"] == metrics["counts"]["train"] * 37 * 37 * 3  # resize size 37
    assert record["training_images"] == "memory-mapped from the image cache"


def test_export_check_and_qat_map_the_entries_finetune_built(toy_run):
    from edgetl.data.heldout import evaluation_set
    from edgetl.quantize.recipes import calibration_set
    from edgetl.rundir import read_manifest

    _, run_dir = toy_run
    built = json.loads((run_dir / "metrics.json").read_text())["data"]["cache"]
    val, _, _, splits = evaluation_set(run_dir, read_manifest(run_dir), None)  # what parity is measured on
    assert val.cache["reused"] is True and val.cache["entry"] == built["val"]["entry"]
    again = load_split(splits.train, SPEC.resize_size, SPEC, eval_crop=False)  # as qat loads its training split
    assert again.cache["reused"] is True and again.cache["entry"] == built["train"]["entry"]
    calibration_set(splits, SPEC, guard_samples=splits.test, guard_split=val)  # the leakage guard maps the test entry
    test_entries = [e for e in entries(cache.cache_root()) if e.get("first") == os.path.abspath(splits.test[0].path)]
    assert [e["entry"] for e in test_entries] == [Path(built["test"]["entry"]).name]


def test_a_changed_file_gives_a_new_entry(data, tmp_path):
    before = train_split(data, tmp_path / "c")
    changed = Path(before.paths[0])
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(changed)
    after = train_split(data, tmp_path / "c")
    assert after.cache["reused"] is False and after.cache["entry"] != before.cache["entry"]
    assert (after.images[0] == 200).all() and not (before.images[0] == 200).all()
    assert np.array_equal(after.images[1:], before.images[1:])


def test_a_truncated_entry_is_rebuilt_not_used(data, tmp_path):
    first = train_split(data, tmp_path / "c")
    expected, path = np.array(first.images), Path(first.cache["entry"]) / cache.IMAGES
    del first  # a map of a file truncated under it would fault on access
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    again = train_split(data, tmp_path / "c")
    assert again.cache["reused"] is False and np.array_equal(again.images, expected)


BUILDER = """
import sys, time
from pathlib import Path
import edgetl.data.decode as decode
from edgetl.data.cache import load_split
from edgetl.data.folders import discover
from edgetl.runtime.preprocess import PreprocessSpec

data, root, marker, delay = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
real = decode.decode_sample
done = []

def slow(*args):
    done.append(1)
    if len(done) == 5:
        marker.write_text("5 decoded")
    time.sleep(delay)
    return real(*args)

decode.decode_sample = slow
spec = PreprocessSpec.for_size(32)
loaded = load_split(discover(data).train, spec.resize_size, spec, eval_crop=False, workers=1, root=root)
print(loaded.cache["reused"], loaded.cache["entry"], float(loaded.images.astype("float64").sum()))
"""


def start_builder(data: Path, root: Path, marker: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(data), str(root), str(marker), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the builder never got going"
        time.sleep(0.05)


def test_a_killed_builder_leaves_nothing_that_is_used(data, tmp_path):
    root, marker = tmp_path / "c", tmp_path / "marker"
    builder = start_builder(data, root, marker, delay=0.5)
    wait_for(marker, builder)
    builder.send_signal(signal.SIGKILL)
    builder.wait(timeout=60)
    assert [e["state"] for e in entries(root)] == ["unfinished"]  # only its private folder
    loaded = train_split(data, root)
    assert loaded.cache["reused"] is False
    assert [e["state"] for e in entries(root)] == ["ok"]  # the leftover was removed
    samples = discover(data).train
    assert np.array_equal(loaded.images, np.stack([decode_sample(s.path, 37, SPEC, False)[0] for s in samples]))


def test_two_processes_share_one_entry_built_once(data, tmp_path):
    root = tmp_path / "c"
    first = start_builder(data, root, tmp_path / "m1", delay=0.05)
    wait_for(tmp_path / "m1", first)  # the first holds the entry's lock and is decoding
    second = start_builder(data, root, tmp_path / "m2", delay=0.05)
    outputs = [proc.communicate(timeout=300) for proc in (first, second)]
    assert [proc.returncode for proc in (first, second)] == [0, 0], outputs
    lines = [out.split() for out, _ in outputs]
    assert [line[0] for line in lines] == ["False", "True"]  # the second waited and mapped
    assert lines[0][1] == lines[1][1] and lines[0][2] == lines[1][2]
    assert not (tmp_path / "m2").exists()  # the second decoded nothing
    assert len(entries(root)) == 1


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(data, tmp_path, monkeypatch):
    root = tmp_path / "c"
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DataError, match=r"needs 0 MiB in .* but its disk has 0 MiB free"):
        train_split(data, root)
    monkeypatch.undo()

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache, "_write_synced", no_space)
    with pytest.raises(DataError, match="is full") as info:
        train_split(data, root)
    assert "--cache-dir" in info.value.hint
    assert entries(root) == []  # the private folder went with the error


def test_finetune_with_an_unwritable_cache_is_one_line(toy_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = dict(os.environ, EDGETL_CACHE_DIR=str(blocker / "cache"))
    proc = subprocess.run([sys.executable, "-m", "edgetl", "finetune", str(toy_data), "--out", str(tmp_path / "run"),
                           "--weights", "none", "--width", "0.35", "--image-size", "32"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edgetl: error:")]
    assert len(errors) == 1 and "cannot write the image cache" in errors[0], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr


def test_cache_ls_and_clear(data, tmp_path):
    root = tmp_path / "c"
    train_split(data, root)

    def edgetl(*args: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "edgetl", "cache", *args, "--cache-dir", str(root), "--json"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    count = len(discover(data).train)
    listed = edgetl("ls")
    assert listed["root"] == str(root) and len(listed["entries"]) == 1
    assert listed["entries"][0]["images"] == count and listed["entries"][0]["mode"] == "train"
    cleared = edgetl("clear")
    assert len(cleared["removed"]) == 1 and cleared["bytes_freed"] > count * 37 * 37 * 3
    assert edgetl("ls")["entries"] == []


def test_clear_leaves_an_entry_being_built(data, tmp_path):
    import fcntl

    root = tmp_path / "c"
    key = train_split(data, root).cache["entry"].rsplit("/", 1)[1]
    with open(root / f"{key}.lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert cache.clear(root)["busy"] == [key]
    assert cache.clear(root)["removed"] == [key]


# ----------------------------------------------------------------------------- training from the cache


def one_epoch(source) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = EdgeClassifier(3, 0.35)
    cfg = FinetuneConfig.build({**TOY_CONFIG, "batch_size": 8})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_one_epoch(model.train(), source, np.arange(20) % 3, cfg, optimizer, scheduler, torch.device("cpu"), 0)
    return model.state_dict()


def test_streamed_batches_train_the_same_model_as_resident_ones(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (20, 37, 37, 3), np.uint8)
    images.tofile(tmp_path / "images.u8")
    mapped = np.memmap(tmp_path / "images.u8", np.uint8, "c", shape=images.shape)
    streamed, resident = place(mapped, torch.device("cpu"), "stream"), place(mapped, torch.device("cpu"))
    assert isinstance(streamed, Streamed) and isinstance(resident, Resident)
    assert resident.images.data_ptr() == mapped.ctypes.data  # the map itself, no copy
    a, b, c = one_epoch(streamed), one_epoch(resident), one_epoch(torch.from_numpy(images))
    assert all(torch.equal(a[k], b[k]) and torch.equal(b[k], c[k]) for k in a)


def test_auto_keeps_a_split_on_the_gpu_only_when_it_takes_at_most_half_its_free_memory():
    assert gpu_placement(4 * 2**30, 8 * 2**30, "auto") == "device"
    assert gpu_placement(4 * 2**30 + 1, 8 * 2**30, "auto") == "stream"
    assert gpu_placement(100 * 2**30, 8 * 2**30, "device") == "device"  # asked for: an error if it does not fit
    assert gpu_placement(1, 8 * 2**30, "stream") == "stream"


# ----------------------------------------------------------------------------- faster decode


def photo(path: Path, size: tuple[int, int]) -> Path:
    """A smooth photo-like JPEG (gradients and blobs, mild noise)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    rng = np.random.default_rng(1)
    base = 120 + 100 * np.sin(6 * xx)[..., None] * np.array([1, 0.4, -0.6]) + 90 * yy[..., None]
    pixels = np.clip(base + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=92)
    return path


def test_large_jpegs_decode_reduced_to_the_same_input(tmp_path):
    big = photo(tmp_path / "big.jpg", (1600, 1200))
    spec = PreprocessSpec.for_size(128)  # resize 146: decoded at 1/4 -> 400 x 300 (both sides >= 2 x 146)
    reduced = decode_image(big, spec.resize_size)
    assert reduced.shape == (300, 400, 3)
    full = decode_image(big)
    difference = np.abs(prepare(reduced, spec).astype(int) - prepare(full, spec).astype(int))
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 4  # resize noise, not another image
    small = photo(tmp_path / "small.jpg", (580, 580))  # under four times the resize size: decoded in full
    assert np.array_equal(decode_image(small, spec.resize_size), decode_image(small))


def test_a_large_jpeg_has_one_identity_in_every_split(tmp_path):
    big = photo(tmp_path / "big.jpg", (1600, 1200))
    spec = PreprocessSpec.for_size(64)
    as_train = decode_sample(big, spec.resize_size, spec, eval_crop=False)[1]
    as_val = decode_sample(big, spec.resize_size, spec, eval_crop=True)[1]
    assert as_train == as_val  # held_out_overlap and the calibration leakage guard compare these
