"""Decode images into uint8 arrays: one decoder for training, evaluation, calibration and parity.

Images are decoded once (Pillow: any mode, EXIF orientation applied, -> RGB) into uint8 arrays held in
memory: training crops come from a square ``resize_size`` cache, evaluation uses the exact device
preprocessing (:func:`edgetl.runtime.preprocess.prepare`). Unreadable files are skipped and reported.
An image's identity is its decoded pixels (:func:`pixel_digest`), not its file bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from edgetl.data.folders import Sample
from edgetl.errors import DataError, first_line
from edgetl.runtime.preprocess import PreprocessSpec, center_crop, prepare, resize_shorter

log = logging.getLogger(__name__)


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
