"""The held-out images a run is judged on: its validation split (or a folder the user names), decoded
exactly as the device will see them, and the digest a verdict records of them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.data.cache import load_split
from edgetl.data.decode import LoadedSplit
from edgetl.data.folders import DatasetSplits, Sample, discover, image_files
from edgetl.errors import DataError, RunDirError
from edgetl.runtime.preprocess import PreprocessSpec

# What parity is measured with: (the held-out images, their description, the classes, the float model's
# logits on them).
Evaluation = tuple[LoadedSplit, dict[str, Any], list[str], np.ndarray]


def evaluation_set(
    run_dir: Path, manifest: dict[str, Any], data: str | os.PathLike | None
) -> tuple[LoadedSplit, dict[str, Any], list[str], DatasetSplits | None]:
    """The images parity is measured on: the run's validation split, or every image of ``data``.

    Returns (LoadedSplit, description, classes, splits-or-None). The description says where the
    images come from, how many there are and their :func:`evidence_digest`.

    Raises:
        RunDirError: the run was never fine-tuned.
        DataError: the dataset changed since fine-tuning; ``data`` is missing, empty or has folders
            that are not classes of the model.
    """
    stage = manifest["stages"].get("finetune")
    if stage is None:
        raise RunDirError(f"{run_dir} has no fine-tuning record", hint="run edgetl finetune first")
    spec = PreprocessSpec.from_dict(stage["preprocess"])
    classes = stage["labels"]
    if data is None:
        cfg = stage["config"]
        splits = discover(stage["data"]["root"], cfg["val_fraction"], cfg["seed"])
        if splits.fingerprint() != stage["data"]["fingerprint"]:
            raise DataError(
                f"the data in {stage['data']['root']} changed since fine-tuning",
                hint="pass --data DIR with images to check on",
            )
        samples, description = splits.val, {"source": "val split", "root": stage["data"]["root"]}
    else:
        root = Path(data)
        if not root.is_dir():
            raise DataError(f"evaluation folder {root} does not exist")
        unknown = sorted({d.name for d in root.iterdir() if d.is_dir()} - set(classes))
        if unknown:
            raise DataError(f"{root} has folders that are not classes of this model: {', '.join(unknown)}")
        samples = [Sample(p, i) for i, c in enumerate(classes) if (root / c).is_dir()
                   for p in image_files(root / c)]  # fmt: skip
        if not samples:
            raise DataError(f"no images in class folders under {root}")
        splits, description = None, {"source": "folder", "root": str(root)}
    loaded = load_split(samples, spec.resize_size, spec, eval_crop=True)
    description["count"] = len(loaded.labels)
    description["sha256"] = evidence_digest(loaded.images, loaded.labels)
    return loaded, description, classes, splits


def evidence_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of what a verdict was measured on: the model-input pixels of every image and its label."""
    digest = hashlib.sha256(np.ascontiguousarray(images).data)
    digest.update(np.asarray(labels, np.int64).tobytes())
    return digest.hexdigest()
