"""Calibration recipes (``calib/*.toml``) and the calibration set they select.

A recipe picks images from the training split (never val/test) through the eval preprocessing; a
user's ``--calib-dir`` can replace it. The leakage guard refuses calibration images whose content is
also in the sets parity is measured on.
"""

from __future__ import annotations

import hashlib
import os
import random
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.config import check_keys, data_dir
from edgetl.data.cache import load_split
from edgetl.data.decode import LoadedSplit
from edgetl.data.folders import IMAGE_EXTENSIONS, DatasetSplits, Sample
from edgetl.errors import ConfigError, DataError, first_line
from edgetl.rundir import sha256_file
from edgetl.runtime.preprocess import PreprocessSpec


@dataclass(frozen=True)
class CalibRecipe:
    """Which images calibrate the int8 model."""

    source: str = "train"  # the split drawn from
    per_class: int = 32  # images per class
    max_images: int = 320  # overall cap
    seed: int = 0
    preprocessing: str = "eval"  # calibration always sees the device's preprocessing
    bias_correction: bool = True  # subtract each layer's expected weight-rounding error from its bias
    name: str = "default"  # the recipe's name (file stem); not a key in the file

    def __post_init__(self) -> None:
        if self.source != "train":
            raise ConfigError(
                f"calibration source {self.source!r} is not allowed",
                hint="only 'train': val and test are what parity is measured on",
            )
        if self.preprocessing != "eval":
            raise ConfigError("calibration preprocessing must be 'eval' (what the device sees)")
        if self.per_class < 1 or self.max_images < 1:
            raise ConfigError("per_class and max_images must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_recipe(name_or_path: str) -> CalibRecipe:
    """Load ``calib/<name>.toml`` or a recipe file given by path.

    Raises:
        ConfigError: unknown recipe, unreadable TOML, unknown key (with a suggestion), bad value.
    """
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = data_dir("calib") / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in data_dir("calib").glob("*.toml"))
        raise ConfigError(
            f"no calibration recipe {name_or_path!r}",
            hint=f"known recipes: {', '.join(known) or 'none'}; or give a .toml path",
        )
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read calibration recipe {path}: {first_line(exc)}") from None
    valid = {f.name for f in fields(CalibRecipe)} - {"name"}
    check_keys(values, valid, f"calibration recipe {path}")
    for key, value in values.items():
        expected = {"source": str, "preprocessing": str, "bias_correction": bool}.get(key, int)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: {key} must be a {expected.__name__}, got {value!r}")
    return CalibRecipe(**values, name=path.stem)


@dataclass
class CalibrationSet:
    images: np.ndarray  # uint8 [N, S, S, 3], eval-preprocessed
    paths: list[str]
    sha256: str  # hash over the sorted content hashes of the images' files
    description: dict[str, Any]


def _select(samples: list[Sample], recipe: CalibRecipe) -> list[Sample]:
    rng = random.Random(recipe.seed)
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    chosen = []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(group)
        chosen += group[: recipe.per_class]
    rng.shuffle(chosen)
    return chosen[: recipe.max_images]


def _content_hashes(paths: list[str | os.PathLike]) -> dict[str, str]:
    return {str(p): sha256_file(p) for p in paths}


def calibration_set(
    splits: DatasetSplits,
    spec: PreprocessSpec,
    recipe: CalibRecipe | None = None,
    calib_dir: str | os.PathLike | None = None,
    guard_samples: list[Sample] | None = None,
    guard_split: LoadedSplit | None = None,
) -> CalibrationSet:
    """Select, decode and leakage-check the calibration images.

    Args:
        splits: the run's dataset (its train split feeds recipes).
        spec: the model's preprocessing.
        recipe: which training images to use (ignored with ``calib_dir``).
        calib_dir: a folder of the user's own representative images instead.
        guard_samples: more images parity is measured on (the test split); none of them may be in the
            calibration set. Decoded through the image cache: the run's own entry of that split.
        guard_split: images parity is measured on that are decoded already (their pixel digests are
            used as they are, not decoded again).

    Raises:
        DataError: empty calibration folder, or leakage into the parity set.
    """
    if calib_dir is not None:
        root = Path(calib_dir)
        if not root.is_dir():
            raise DataError(f"calibration folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"no images in calibration folder {root}")
        samples = [Sample(p, -1) for p in files]
        description: dict[str, Any] = {"source": "dir", "dir": str(root.resolve())}
    else:
        recipe = recipe or CalibRecipe()
        samples = _select(splits.train, recipe)
        description = {"source": "recipe", "recipe": recipe.to_dict()}

    hashes = _content_hashes([s.path for s in samples])
    loaded = load_split(samples, spec.resize_size, spec, eval_crop=True)
    guarded = dict(zip(guard_split.digests, guard_split.paths, strict=True)) if guard_split is not None else {}
    if guard_samples:
        more = load_split(guard_samples, spec.resize_size, spec, eval_crop=True)
        guarded.update(zip(more.digests, more.paths, strict=True))
    _refuse_leakage(dict(zip(loaded.digests, loaded.paths, strict=True)), guarded)
    digest = hashlib.sha256("\n".join(sorted(hashes.values())).encode()).hexdigest()
    description.update({"count": len(loaded.paths), "sha256": digest})
    return CalibrationSet(images=loaded.images, paths=loaded.paths, sha256=digest, description=description)


def _refuse_leakage(calibration: dict[str, str], guarded: dict[str, str]) -> None:
    """Refuse calibration images whose decoded pixels equal a guarded image's (a copy, a rename or a
    lossless re-encode of a validation image is the same image; comparing file bytes misses the last).
    Both map pixel digest -> path."""
    leaked = [(path, guarded[d]) for d, path in calibration.items() if d in guarded]
    if leaked:
        first, twin = leaked[0]
        raise DataError(
            f"{len(leaked)} calibration image(s) are also in the parity set (same pixels), e.g. {first} = {twin}",
            hint="calibrate on images that parity does not measure (remove the duplicates)",
        )
