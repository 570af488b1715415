"""A dataset's splits decoded for a run (through the image cache), and the check that held-out images
are not training images."""

from __future__ import annotations

import logging
import sys
from typing import Any

from edgetl.data.cache import load_split
from edgetl.data.decode import LoadedSplit
from edgetl.data.folders import DatasetSplits
from edgetl.errors import DataError
from edgetl.runtime.preprocess import PreprocessSpec

log = logging.getLogger(__name__)


def load_splits(splits: DatasetSplits, spec: PreprocessSpec, workers: int | None, skipped: list[dict[str, str]],
                show_progress: bool = True) -> dict[str, LoadedSplit]:  # fmt: skip
    """train (square ``resize_size`` images for random crops), val and test (the device's input crops).

    Raises:
        DataError: a split has no readable image; a class has no readable training image.
    """
    from tqdm import tqdm

    loaded = {}
    for name, eval_crop in (("train", False), ("val", True), ("test", True)):
        samples = getattr(splits, name)
        with tqdm(total=len(samples), desc=f"decoding {name}", unit="img", file=sys.stderr, leave=False,
                  dynamic_ncols=True, disable=None if show_progress else True) as bar:  # fmt: skip
            loaded[name] = load_split(samples, spec.resize_size, spec, eval_crop=eval_crop, workers=workers,
                                      skipped=skipped,
                                      progress=lambda done, bar=bar: bar.update(done - bar.n))  # fmt: skip
        if samples:
            how = "reused from" if loaded[name].cache["reused"] else "decoded into"
            log.info("%s: %d images %s the image cache in %.1fs", name, len(loaded[name].labels), how,
                     loaded[name].cache["seconds"])  # fmt: skip
    present = set(loaded["train"].labels.tolist())
    missing = [c for i, c in enumerate(splits.classes) if i not in present]
    if missing:
        raise DataError(f"no readable training images left for class(es): {', '.join(missing)}")
    return loaded


def cache_record(loaded: dict[str, LoadedSplit]) -> dict[str, Any]:
    """What metrics.json says about each split's cache entry: where, reused or built, seconds, bytes."""
    return {name: {**split.cache, "bytes": int(split.images.nbytes)} for name, split in loaded.items() if split.cache}


def held_out_overlap(loaded: dict[str, LoadedSplit]) -> dict[str, int]:
    """How many validation and test images are also training images (same decoded pixels).

    Every validation image in training is refused: the accuracy and early stopping would measure
    memory, not the model. Some is warned about loudly and recorded in metrics.json.

    Raises:
        DataError: the validation split is wholly contained in the training split.
    """
    seen = set(loaded["train"].digests)
    overlap = {name: sum(d in seen for d in loaded[name].digests) for name in ("val", "test")}
    val_count = len(loaded["val"].digests)
    if val_count and overlap["val"] == val_count:
        raise DataError(f"all {val_count} validation images are also training images (same pixels)",
                        hint="give val/ images that are not in train/, or drop val/ to split train/")  # fmt: skip
    for name, count in overlap.items():
        if count:
            log.warning("%d of %d %s images are ALSO TRAINING IMAGES (same pixels): their accuracy overstates "
                        "the model; remove them from one of the splits", count, len(loaded[name].digests), name)
    return overlap
