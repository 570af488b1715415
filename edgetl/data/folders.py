"""Find and split an image-folder dataset.

Two layouts are accepted:

* ``DATA/train/<class>/...`` with ``DATA/val/<class>/...`` (or ``validation/``); without a val split
  the train split is divided as below;
* ``DATA/<class>/...``, divided into train and val by a seeded, stratified ``val_fraction``.

Either may have ``DATA/test/<class>/...``: it is never used for training or model selection, only for
a final, separately reported evaluation.

Files are found here, not opened: :mod:`edgetl.data.decode` decodes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from edgetl.errors import DataError

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
    skipped_folders: list[str] = field(default_factory=list)  # hidden and edgetl run folders, not data

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


def skip_reason(folder: Path) -> str | None:
    """Why a folder of a dataset is not data (None: it is): hidden (``.git``, ``...``, ``..x``), or an
    edgetl run or bundle folder (it has an edgetl manifest.json: its charts are not images of a class)."""
    if folder.name.startswith("."):
        return "hidden"
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        found = json.loads(manifest.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(found, dict) and ("edgetl_version" in found or found.get("kind") == "edgetl-bundle"):
        return "an edgetl run or bundle folder"
    return None


def _skip(folder: Path, reason: str, skipped: list[tuple[str, str]] | None) -> None:
    if skipped is not None and (str(folder), reason) not in skipped:
        skipped.append((str(folder), reason))


def _visible_dirs(path: Path, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Class folders: hidden and edgetl run folders are skipped (and added to ``skipped``). A name with a
    control character (a newline, a tab, an escape, a Unicode line separator) is refused: a class name
    becomes a line of labels.txt and a C string in firmware headers, where it would split into two
    labels or change the class count."""
    import unicodedata

    found = []
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        reason = skip_reason(folder)
        if reason:
            _skip(folder, reason, skipped)
        else:
            found.append(folder)
    for folder in found:
        if any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in folder.name):
            raise DataError(f"class folder name {folder.name!r} in {path} contains a control character",
                            hint="rename the folder: class names become lines of labels.txt")  # fmt: skip
    return found


def image_files(class_dir: Path, skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """The image files below a class folder, sorted: hidden files, other suffixes, and hidden or edgetl
    run folders below it (added to ``skipped``) left out."""
    found = []
    for folder, subfolders, files in os.walk(class_dir):
        keep = []
        for name in sorted(subfolders):
            reason = skip_reason(Path(folder) / name)
            if reason:
                _skip(Path(folder) / name, reason, skipped)
            else:
                keep.append(name)
        subfolders[:] = keep
        found += [Path(folder) / f for f in files
                  if Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith(".")]  # fmt: skip
    return sorted(p for p in found if p.is_file())


def _scan(split_dir: Path, classes: list[str] | None = None,
          skipped: list[tuple[str, str]] | None = None) -> tuple[list[str], dict[str, list[Path]]]:  # fmt: skip
    """Class folders of one split and their image files; empty classes are an error."""
    found = {d.name: image_files(d, skipped) for d in _visible_dirs(split_dir, skipped)}
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

    skipped: list[tuple[str, str]] = []
    train, val, classes, layout = _train_and_val(root, val_fraction, seed, skipped)
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
        _, test_files = _scan(test_dir, classes, skipped)
        test = [Sample(p, i) for i, c in enumerate(classes) for p in test_files.get(c, [])]
    for folder, reason in skipped:
        log.warning("skipping folder %s (%s)", folder, reason)
    return DatasetSplits(root=root, classes=classes, train=train, val=val, test=test, layout=layout,
                         skipped_folders=[folder for folder, _ in skipped])  # fmt: skip


def _train_and_val(root: Path, val_fraction: float, seed: int,
                   skipped: list[tuple[str, str]]) -> tuple[list[Sample], list[Sample], list[str], str]:  # fmt: skip
    """(train, val, classes, layout) of either layout (see the module docstring)."""
    train_dir = root / "train"
    if train_dir.is_dir():
        classes, train_files = _scan(train_dir, None, skipped)
        val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
        splits = {"train", "test", val_dir.name if val_dir else "val"}
        for other in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in splits):
            _skip(other, skip_reason(other) or "not train/, val/ or test/ in a dataset with a train/ split", skipped)
        if val_dir is None:
            return (*_stratified_split(train_files, classes, val_fraction, seed), classes, "folders")
        _, val_files = _scan(val_dir, classes, skipped)
        train = [Sample(p, i) for i, c in enumerate(classes) for p in train_files[c]]
        val = [Sample(p, i) for i, c in enumerate(classes) for p in val_files.get(c, [])]
        return train, val, classes, "splits"
    class_dirs = [d.name for d in _visible_dirs(root, skipped) if d.name != "test"]
    files = {name: image_files(root / name, skipped) for name in class_dirs}
    classes = sorted(files)
    empty = [name for name in classes if not files[name]]
    if empty:
        raise DataError(
            f"class folder(s) with no images in {root}: {', '.join(empty)}",
            hint=f"add images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder",
        )
    if len(classes) < 2:
        return [], [], classes, "folders"
    return (*_stratified_split(files, classes, val_fraction, seed), classes, "folders")
