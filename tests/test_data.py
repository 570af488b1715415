"""Dataset discovery, splitting, decoding of every image mode, and bad files."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.data.cache import load_split
from edgetl.data.decode import decode_image
from edgetl.data.folders import discover
from edgetl.errors import DataError
from edgetl.runtime.preprocess import PreprocessSpec, load_image


def write_image(path: Path, size=(24, 16), color=(200, 30, 30), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path, format=fmt)
    return path


def make_folder(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for name, count in counts.items():
        for i in range(count):
            write_image(root / name / f"{i:03d}{ext}", color=(10 * i % 255, 100, 50))
    return root


# ----------------------------------------------------------------------------- layouts


def test_class_folders_are_split_stratified_and_seeded(tmp_path):
    root = make_folder(tmp_path / "d", {"cat": 10, "dog": 20, "owl": 5})
    splits = discover(root, val_fraction=0.2, seed=1)
    assert splits.classes == ["cat", "dog", "owl"]
    assert splits.layout == "folders"
    val_per_class = np.bincount([s.label for s in splits.val], minlength=3).tolist()
    assert val_per_class == [2, 4, 1]
    assert len(splits.train) + len(splits.val) == 35
    assert not {s.path for s in splits.train} & {s.path for s in splits.val}
    again = discover(root, val_fraction=0.2, seed=1)
    assert [s.path for s in again.val] == [s.path for s in splits.val]
    other = discover(root, val_fraction=0.2, seed=2)
    assert [s.path for s in other.val] != [s.path for s in splits.val]


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_explicit_train_and_val_splits(tmp_path, val_name):
    make_folder(tmp_path / "train", {"a": 3, "b": 4})
    make_folder(tmp_path / val_name, {"a": 2, "b": 1})
    splits = discover(tmp_path)
    assert splits.layout == "splits"
    assert splits.counts() == {"train": 7, "val": 3, "test": 0}


def test_train_only_is_split_and_test_is_kept_apart(tmp_path):
    make_folder(tmp_path / "train", {"a": 5, "b": 5})
    make_folder(tmp_path / "test", {"a": 2, "b": 3})
    splits = discover(tmp_path, val_fraction=0.2)
    assert splits.counts() == {"train": 8, "val": 2, "test": 5}
    test_paths = {s.path for s in splits.test}
    assert all("test" in p.parts for p in test_paths)
    assert not test_paths & {s.path for s in splits.train + splits.val}


def test_test_folder_beside_class_folders_is_the_test_split(tmp_path):
    make_folder(tmp_path, {"a": 4, "b": 4})
    make_folder(tmp_path / "test", {"a": 1, "b": 1})
    splits = discover(tmp_path)
    assert splits.classes == ["a", "b"]
    assert len(splits.test) == 2


def test_non_image_files_and_hidden_folders_are_ignored(tmp_path):
    make_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "notes.txt").write_text("hello")
    make_folder(tmp_path / ".cache", {"x": 1})
    splits = discover(tmp_path)
    assert splits.classes == ["a", "b"]
    assert len(splits.train) + len(splits.val) == 6


def _edgetl_run(folder: Path, kind: str) -> None:
    """What an old run (or bundle) copied into a dataset looks like: charts and a manifest."""
    write_image(folder / "training.png", size=(64, 48))
    write_image(folder / "parity.png", size=(64, 48))
    manifest = {"edgetl_version": "0.9", "files": {}, "stages": {}} if kind == "run" else {"kind": "edgetl-bundle"}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", ["run", "bundle"])
def test_edgetl_run_folders_inside_the_data_are_skipped_and_named(tmp_path, caplog, kind):
    make_folder(tmp_path, {"a": 4, "b": 4})
    _edgetl_run(tmp_path / "runs-old", kind)  # beside the classes: it would become a class
    _edgetl_run(tmp_path / "a" / "nested" / "run", kind)  # inside a class: its charts would be "a" images
    (tmp_path / "b" / "manifest.json").write_text("[]")  # not an edgetl manifest: b stays a class
    with caplog.at_level(logging.WARNING, logger="edgetl.data.folders"):
        splits = discover(tmp_path)
    assert splits.classes == ["a", "b"] and len(splits.train) + len(splits.val) == 8
    assert splits.skipped_folders == [str(tmp_path / "runs-old"), str(tmp_path / "a" / "nested" / "run")]
    for folder in splits.skipped_folders:
        assert f"skipping folder {folder} (an edgetl run or bundle folder)" in caplog.text


def test_every_skipped_folder_is_named(tmp_path, caplog):
    make_folder(tmp_path / "train", {"a": 3, "b": 3})
    make_folder(tmp_path / "val", {"a": 1, "b": 1})
    for name in ("...", "..x", ".git"):
        make_folder(tmp_path / "train" / name, {"c": 1})
    make_folder(tmp_path / "train" / "a" / ".thumbs", {"x": 2})  # hidden inside a class: not "a" images
    make_folder(tmp_path / "extra", {"a": 1})  # beside train/ and val/: not a split
    with caplog.at_level(logging.WARNING, logger="edgetl.data.folders"):
        splits = discover(tmp_path)
    assert splits.counts() == {"train": 6, "val": 2, "test": 0}
    expected = {str(tmp_path / "train" / n) for n in ("...", "..x", ".git")}
    expected |= {str(tmp_path / "train" / "a" / ".thumbs"), str(tmp_path / "extra")}
    assert set(splits.skipped_folders) == expected
    assert all(f"skipping folder {folder} (" in caplog.text for folder in expected)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: make_folder(p, {"only": 4}), "need at least 2"),
        (lambda p: (make_folder(p, {"a": 3}), (p / "b").mkdir()), "no images"),
        (lambda p: (make_folder(p / "train", {"a": 3, "b": 3}), make_folder(p / "val", {"c": 1})),
         "classes that the train split lacks"),
        (lambda p: make_folder(p, {"a": 1, "b": 4}), "at least 2 are needed"),
    ],
    ids=["missing", "one-class", "empty-class", "unknown-val-class", "too-few-to-split"],
)
def test_unusable_datasets_are_clear_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        discover(root)


def test_a_file_is_not_a_dataset(tmp_path):
    file = write_image(tmp_path / "x.png")
    with pytest.raises(DataError, match="not a folder"):
        discover(file)


# ----------------------------------------------------------------------------- decoding


def exif_rotated_jpeg(path: Path) -> Path:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


@pytest.mark.parametrize(
    "name, make",
    [
        ("grey.jpg", lambda p: write_image(p, mode="L")),
        ("rgba.png", lambda p: write_image(p, mode="RGBA")),
        ("la.png", lambda p: write_image(p, mode="LA")),
        ("cmyk.jpg", lambda p: write_image(p, mode="CMYK")),
        ("palette.png", lambda p: write_image(p, mode="P")),
        ("image.bmp", lambda p: write_image(p)),
        ("image.webp", lambda p: write_image(p, fmt="WEBP")),
        ("upper.JPEG", lambda p: write_image(p, fmt="JPEG")),
    ],
)
def test_every_mode_decodes_to_rgb(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    image = decode_image(path)
    assert image.dtype == np.uint8
    assert image.shape == (16, 24, 3)


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(path)
    image = decode_image(path)
    assert image.shape == (8, 8, 3)
    assert int(image[0, 0, 0]) == round(40000 / 257)


def test_exif_orientation_is_applied(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "rotated.jpg")
    image = decode_image(path)
    assert image.shape == (40, 20, 3)  # portrait after rotation
    top, bottom = image[2, 10], image[-3, 10]
    assert top[2] > 200 and top[0] < 60  # blue half ends up on top after a clockwise turn
    assert bottom[0] > 200 and bottom[2] < 60
    assert np.array_equal(image, load_image(str(path)))  # the device decoder agrees


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", ""),
        ("text.png", b"this is not an image", ""),
        ("truncated.jpg", None, "truncated"),
    ],
)
def test_bad_files_are_skipped_counted_and_listed(tmp_path, caplog, name, content, reason):
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    bad = root / "a" / name
    if content is None:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
            buffer, format="JPEG"
        )
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    bad.write_bytes(content)
    splits = discover(root, val_fraction=0.25)
    skipped: list[dict] = []
    samples = splits.train + splits.val
    loaded = load_split(samples, 16, PreprocessSpec.for_size(16), eval_crop=True, skipped=skipped)
    assert [entry["path"] for entry in skipped] == [str(bad)]
    assert reason in skipped[0]["reason"]
    assert len(loaded.labels) == len(samples) - 1
    assert str(bad) not in loaded.paths
    assert any("skipping unreadable image" in r.message for r in caplog.records)


def test_all_unreadable_is_an_error(tmp_path):
    root = tmp_path / "d"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            (root / name / f"{i}.jpg").write_bytes(b"")
    splits = discover(root)
    with pytest.raises(DataError, match="none of the"):
        load_split(splits.train, 16, PreprocessSpec.for_size(16), eval_crop=False)


def test_train_cache_is_square_resize_and_eval_is_device_crop(tmp_path):
    root = tmp_path / "d"
    for name in ("a", "b"):
        for i in range(2):
            write_image(root / name / f"{i}.png", size=(90, 60))
    splits = discover(root)
    spec = PreprocessSpec.for_size(32)
    train = load_split(splits.train, spec.resize_size, spec, eval_crop=False)
    val = load_split(splits.val, spec.resize_size, spec, eval_crop=True)
    assert train.images.shape[1:] == (spec.resize_size, spec.resize_size, 3)
    assert val.images.shape[1:] == (32, 32, 3)
