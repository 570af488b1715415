"""Find, split and decode an image-folder dataset.

Two layouts are accepted:

* ``DATA/train/<class>/...`` with ``DATA/val/<class>/...`` (or ``validation/``); without a val split
  the train split is divided as below;
* ``DATA/<class>/...``, divided into train and val by a seeded, stratified ``val_fraction``.

Either may have ``DATA/test/<class>/...``: it is never used for training or model selection, only for
a final, separately reported evaluation.

Images are decoded once (Pillow: any mode, EXIF orientation applied, -> RGB) into uint8 arrays held in
memory: training crops come from a square ``resize_size`` cache, evaluation uses the exact device
preprocessing (:func:`edgetl.runtime.preprocess.prepare`). Unreadable files are skipped and reported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetl.errors import DataError, first_line
from edgetl.runtime.preprocess import PreprocessSpec, center_crop, prepare, resize_shorter

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
VAL_DIR_NAMES = ("val", "validation")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class DatasetSplits:
    """The dataset as edgetl sees it: class names and the samples of each split."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    layout: str = "folders"  # "folders" (split by val_fraction) or "splits" (train/ and val/ given)

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def fingerprint(self) -> str:
        """Hash of every sample's split, relative path, size and label: changes when the data does."""
        digest = hashlib.sha256("\0".join(self.classes).encode())
        for split in ("train", "val", "test"):
            for sample in getattr(self, split):
                rel = sample.path.relative_to(self.root).as_posix()
                size = sample.path.stat().st_size if sample.path.exists() else -1
                digest.update(f"\n{split}\0{rel}\0{size}\0{sample.label}".encode())
        return digest.hexdigest()


def _visible_dirs(path: Path) -> list[Path]:
    """Class folders (hidden ones skipped). A name with a control character (a newline, a tab, an
    escape, a Unicode line separator) is refused: a class name becomes a line of labels.txt and a C
    string in firmware headers, where it would split into two labels or change the class count."""
    import unicodedata

    found = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in found:
        if any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in folder.name):
            raise DataError(f"class folder name {folder.name!r} in {path} contains a control character",
                            hint="rename the folder: class names become lines of labels.txt")  # fmt: skip
    return found


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in class_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _scan(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], dict[str, list[Path]]]:
    """Class folders of one split and their image files; empty classes are an error."""
    found = {d.name: _image_files(d) for d in _visible_dirs(split_dir)}
    if classes is None:
        classes = sorted(found)
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DataError(
                f"{split_dir} has classes that the train split lacks: {', '.join(extra)}",
                hint="every class in val/ or test/ needs training images too",
            )
    empty = [name for name in classes if name in found and not found[name]]
    if empty:
        raise DataError(
            f"class folder(s) with no images in {split_dir}: {', '.join(empty)}",
            hint=f"add images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder",
        )
    return classes, found


def _stratified_split(
    files_by_class: dict[str, list[Path]], classes: list[str], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    rng = random.Random(seed)
    train, val = [], []
    for label, name in enumerate(classes):
        files = list(files_by_class[name])
        if len(files) < 2:
            raise DataError(
                f"class {name!r} has {len(files)} image; at least 2 are needed to split off validation",
                hint="add images, or give an explicit val/ split",
            )
        rng.shuffle(files)
        n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
        val += [Sample(p, label) for p in sorted(files[:n_val])]
        train += [Sample(p, label) for p in sorted(files[n_val:])]
    return train, val


def discover(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """Find the classes and split the samples of an image-folder dataset.

    Args:
        root: the dataset folder (either layout, see the module docstring).
        val_fraction: share of each class held out for validation when there is no val split.
        seed: seed of the split; the same seed and files give the same split.

    Returns:
        The splits. Files are not opened yet: see :func:`load_split`.

    Raises:
        DataError: missing path, fewer than two classes, an empty class, classes that disagree.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder", hint="give a folder of class sub-folders")

    train_dir = root / "train"
    if train_dir.is_dir():
        classes, train_files = _scan(train_dir)
        val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
        if val_dir is not None:
            _, val_files = _scan(val_dir, classes)
            train = [Sample(p, i) for i, c in enumerate(classes) for p in train_files[c]]
            val = [Sample(p, i) for i, c in enumerate(classes) for p in val_files.get(c, [])]
            layout = "splits"
        else:
            train, val = _stratified_split(train_files, classes, val_fraction, seed)
            layout = "folders"
    else:
        class_dirs = [d.name for d in _visible_dirs(root) if d.name != "test"]
        files = {name: _image_files(root / name) for name in class_dirs}
        classes = sorted(files)
        empty = [name for name in classes if not files[name]]
        if empty:
            raise DataError(
                f"class folder(s) with no images in {root}: {', '.join(empty)}",
                hint=f"add images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder",
            )
        if len(classes) >= 2:
            train, val = _stratified_split(files, classes, val_fraction, seed)
        else:
            train, val = [], []
        layout = "folders"

    if len(classes) < 2:
        raise DataError(
            f"found {len(classes)} class folder(s) in {root}; need at least 2",
            hint="expected DATA/<class>/<images> or DATA/train/<class>/<images>",
        )
    if not val:
        raise DataError(f"the validation split of {root} has no images")

    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        _, test_files = _scan(test_dir, classes)
        test = [Sample(p, i) for i, c in enumerate(classes) for p in test_files.get(c, [])]

    return DatasetSplits(root=root, classes=classes, train=train, val=val, test=test, layout=layout)


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an RGB uint8 array ``[H, W, 3]``.

    Handles grayscale, RGBA / LA / palette (alpha dropped, as OpenCV does on the device), CMYK,
    16-bit and EXIF-rotated images.

    Raises:
        ValueError: the file is empty, truncated or not an image.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
                array = np.asarray(image, dtype=np.float64)
                if image.mode != "F" and array.max(initial=0) > 255:
                    array = array / 257.0  # 16-bit samples -> 8-bit, as OpenCV's IMREAD_COLOR does
                grey = np.clip(np.rint(array), 0, 255).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(first_line(exc)) from None


@dataclass
class LoadedSplit:
    """Decoded images of one split, ready for training or evaluation."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    labels: np.ndarray  # int64 [N]
    paths: list[str]
    digests: list[str] = field(default_factory=list)  # pixel_digest of each decoded image


def pixel_digest(image: np.ndarray) -> str:
    """Identity of an image's content: a hash of its decoded pixels (and shape), so a file re-encoded
    losslessly, renamed or re-saved with other metadata is still the same image."""
    digest = hashlib.blake2b(str(image.shape).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def load_split(
    samples: list[Sample],
    size: int,
    spec: PreprocessSpec,
    *,
    eval_crop: bool,
    workers: int | None = None,
    skipped: list[dict[str, str]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> LoadedSplit:
    """Decode samples into one uint8 array.

    Args:
        samples: what to load.
        size: side of the stored square images.
        spec: the model's preprocessing (its interpolation is used in both modes).
        eval_crop: True: exactly the device preprocessing (``prepare``), at ``spec.image_size``;
            False: the shorter side resized to ``size`` and centre-cropped square (the source of
            random training crops).
        workers: decoding threads (Pillow releases the GIL); None = one per CPU.
        skipped: unreadable files are appended here as ``{"path", "reason"}`` and logged.
        progress: called with the number of images done after each one.

    Raises:
        DataError: no sample could be decoded.
    """

    def load(sample: Sample) -> tuple[np.ndarray, str] | str:
        try:
            image = decode_image(sample.path)
        except ValueError as exc:
            return str(exc)
        if eval_crop:
            return prepare(image, spec), pixel_digest(image)
        return center_crop(resize_shorter(image, size, spec.interpolation), size), pixel_digest(image)

    images, labels, paths, digests = [], [], [], []
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (sample, result) in enumerate(zip(samples, pool.map(load, samples), strict=True), start=1):
            if isinstance(result, str):
                log.warning("skipping unreadable image %s: %s", sample.path, result)
                if skipped is not None:
                    skipped.append({"path": str(sample.path), "reason": result})
            else:
                images.append(result[0])
                digests.append(result[1])
                labels.append(sample.label)
                paths.append(str(sample.path))
            if progress is not None:
                progress(done)
    if samples and not images:
        raise DataError(f"none of the {len(samples)} images could be decoded (see warnings above)")
    side = spec.image_size if eval_crop else size
    array = np.stack(images) if images else np.zeros((0, side, side, 3), np.uint8)
    return LoadedSplit(images=array, labels=np.asarray(labels, np.int64), paths=paths, digests=digests)
