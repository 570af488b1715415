"""The decoded-image cache is a trust surface: a damaged entry (pixels overwritten in place, any shape of
meta.json, indices out of range, shifted labels) is named and rebuilt, never used; ``cache ls`` shows it,
``cache verify`` finds it (issue 28, items 1 and 4)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from faults import cli

from edgetl.data import cache
from edgetl.data.cache import entries, load_split
from edgetl.data.folders import discover
from edgetl.runtime.preprocess import PreprocessSpec

SPEC = PreprocessSpec.for_size(32)
TOY = ["--width", "0.35", "--image-size", "32", "--head-epochs", "1", "--finetune-epochs", "0",
       "--batch-size", "16", "--weights", "none"]  # fmt: skip


@pytest.fixture
def data(toy_data, tmp_path) -> Path:
    return Path(shutil.copytree(toy_data, tmp_path / "data"))


def train_split(data: Path, root: Path):
    return load_split(discover(data).train, SPEC.resize_size, SPEC, eval_crop=False, root=root)


def built(data: Path, root: Path) -> tuple[np.ndarray, Path]:
    """Build the entry; its pixels (a copy) and its folder. The map is dropped before a test damages it."""
    first = train_split(data, root)
    return np.array(first.images), Path(first.cache["entry"])


def damage_pixels(entry: Path, how: str) -> None:
    path = entry / cache.IMAGES
    size = path.stat().st_size
    if how == "zeros":
        path.write_bytes(bytes(size))
    else:  # one byte of one image, in place
        with open(path, "r+b") as handle:
            handle.seek(size // 2)
            byte = handle.read(1)
            handle.seek(size // 2)
            handle.write(bytes([byte[0] ^ 0x01]))


def rebuilt_with_warning(data: Path, root: Path, entry: Path, expected: np.ndarray, caplog) -> str:
    """Loading again rebuilds the entry, warns once naming it, and gives the true pixels."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgetl.data.cache"):
        again = train_split(data, root)
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and str(entry) in warnings[0], caplog.text
    assert again.cache["reused"] is False and np.array_equal(again.images, expected)
    assert np.array_equal(again.labels, [s.label for s in discover(data).train])
    return warnings[0]


@pytest.mark.parametrize("how", ["zeros", "one-byte"])
def test_pixels_overwritten_in_place_are_noticed_and_rebuilt(data, tmp_path, caplog, how):
    expected, entry = built(data, tmp_path / "c")
    damage_pixels(entry, how)
    assert (entry / cache.IMAGES).stat().st_size == expected.nbytes  # the size check alone would pass it
    message = rebuilt_with_warning(data, tmp_path / "c", entry, expected, caplog)
    assert "no longer match their hash" in message
    assert ("1 of" in message) == (how == "one-byte")


def _edit(entry: Path, change) -> None:
    path = entry / cache.META
    meta = json.loads(path.read_text())
    edited = change(meta)
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))


def _set(key: str, value):
    return lambda meta: {**meta, key: value}


META_DAMAGE = {
    "list": lambda m: [],
    "null": lambda m: None,
    "string": lambda m: "x",
    "number": lambda m: 3,
    "deeply-nested": lambda m: "[" * 50_000 + "]" * 50_000,
    "truncated": lambda m: json.dumps(m)[:40],
    "not-utf8": lambda m: "\udcff",
    "count-as-string": _set("count", "48"),
    "count-bool": _set("count", True),
    "labels-missing": lambda m: {k: v for k, v in m.items() if k != "labels"},
    "index-out-of-range": lambda m: {**m, "kept": [*m["kept"][:-1], 10**6]},
    "negative-index": lambda m: {**m, "kept": [-1, *m["kept"][1:]]},
    "duplicate-index": lambda m: {**m, "kept": [m["kept"][0], *m["kept"][:-1]]},
    "shifted-labels": lambda m: {**m, "labels": m["labels"][1:] + m["labels"][:1]},
    "label-as-string": lambda m: {**m, "labels": [str(v) for v in m["labels"]]},
    "skipped-malformed": _set("skipped", [{"index": "0"}]),
    "skipped-extra": _set("skipped", [{"index": 0, "reason": "x"}]),
    "rows-short": lambda m: {**m, "rows": m["rows"][1:]},
    "old-format": _set("format", 2),
    "other-key": _set("key", "0" * 32),
}


@pytest.mark.parametrize("name", sorted(META_DAMAGE))
def test_any_malformed_meta_json_makes_the_entry_rebuilt(data, tmp_path, caplog, name):
    expected, entry = built(data, tmp_path / "c")
    if name == "not-utf8":
        (entry / cache.META).write_bytes(b"\xff\xfe{")
    else:
        _edit(entry, META_DAMAGE[name])
    rebuilt_with_warning(data, tmp_path / "c", entry, expected, caplog)


@pytest.mark.parametrize("shape", ["[]", "null", '"x"', "{}"])
def test_cache_ls_and_clear_show_a_malformed_entry_as_damaged(data, tmp_path, shape):
    root = tmp_path / "c"
    _, entry = built(data, root)
    (entry / cache.META).write_text(shape)
    listed = cli("cache", "ls", "--cache-dir", str(root))
    assert listed.code == 0 and "damaged: meta.json" in listed.stdout, listed
    assert [e["state"] for e in entries(root)] == ["damaged"]
    cleared = cli("cache", "clear", "--cache-dir", str(root), "--json")
    assert cleared.code == 0 and json.loads(cleared.stdout)["removed"] == [entry.name], cleared
    assert not entry.exists()


def test_cache_verify_hashes_every_image_and_removes_damaged_entries(data, toy_data, tmp_path):
    root = tmp_path / "c"
    _, damaged = built(data, root)
    _, intact = built(toy_data, root)  # another dataset: another entry
    assert cli("cache", "verify", "--cache-dir", str(root)).code == 0
    damage_pixels(damaged, "one-byte")
    assert [e["state"] for e in entries(root)] == ["ok", "ok"]  # ls does only the quick checks
    found = cli("cache", "verify", "--cache-dir", str(root), "--json")
    assert found.code == 6, found
    states = {e["entry"]: e["state"] for e in json.loads(found.stdout)["entries"]}
    assert states == {damaged.name: "damaged", intact.name: "ok"}
    text = cli("cache", "verify", "--cache-dir", str(root))
    assert text.code == 6 and f"{damaged.name}" in text.stdout and "1 of" in text.stdout, text
    removed = cli("cache", "verify", "--cache-dir", str(root), "--remove")
    assert removed.code == 0 and "1 damaged, 1 removed" in removed.stdout, removed
    assert not damaged.exists() and intact.exists()
    assert cli("cache", "verify", "--cache-dir", str(root)).code == 0


def test_finetune_on_a_zeroed_cache_entry_warns_and_trains_on_the_real_images(data, tmp_path):
    """The issue's case through the CLI: the first run builds the entries, the train entry's pixels become
    zeros, the second run names it, rebuilds it and records the same training set."""
    root = tmp_path / "c"
    first = cli("finetune", str(data), "--out", str(tmp_path / "r1"), *TOY, "--cache-dir", str(root))
    assert first.code == 0, first
    train_entry = Path(json.loads((tmp_path / "r1" / "metrics.json").read_text())["data"]["cache"]["train"]["entry"])
    damage_pixels(train_entry, "zeros")
    second = cli("finetune", str(data), "--out", str(tmp_path / "r2"), *TOY, "--cache-dir", str(root))
    assert second.code == 0, second
    assert f"the image cache entry {train_entry} is damaged" in second.stderr, second
    record = json.loads((tmp_path / "r2" / "metrics.json").read_text())["data"]["cache"]
    assert record["train"]["reused"] is False and record["val"]["reused"] is True
    rebuilt = np.fromfile(train_entry / cache.IMAGES, np.uint8)
    assert rebuilt.any()
