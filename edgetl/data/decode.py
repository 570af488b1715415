"""Decode images into uint8 arrays: one decoder for training, evaluation, calibration and parity.

Pillow decodes any mode (EXIF orientation applied, -> RGB). Training crops come from a square
``resize_size`` image, evaluation uses the device preprocessing (:func:`edgetl.runtime.preprocess.prepare`).
A JPEG at least four times the model's ``resize_size`` on both sides is decoded at a reduced scale in
the codec (DCT scaling, Pillow's ``draft``: the largest of 1/2, 1/4, 1/8 that keeps both sides at least
twice ``resize_size``) before the same area resize: 6-8x faster on 12-megapixel photos, the same model
input within resize noise (``benchmarks/results/decode_speed.md``; scaling in the codec down to the
resize size itself moved the input 3x more than resize noise, so the last 2x stays with the area
resize). Unreadable files are skipped and reported. An image's identity is its decoded pixels
(:func:`pixel_digest`), not its file bytes; every decoder of one model decodes a file at the same scale,
so identities compare across splits, calibration and parity.

:func:`decoded` runs a bounded pool: at most a few images per thread are in memory at once, whatever the
dataset's size; :mod:`edgetl.data.cache` writes them to disk as they come.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetl.data.folders import Sample
from edgetl.errors import first_line
from edgetl.runtime.preprocess import PreprocessSpec, center_crop, prepare, resize_shorter

DRAFT_MARGIN = 2  # a reduced-scale JPEG decode keeps both sides >= this x the resize size


def decode_image(path: str | os.PathLike, min_side: int | None = None) -> np.ndarray:
    """Decode an image file to an RGB uint8 array ``[H, W, 3]``.

    Handles grayscale, RGBA / LA / palette (alpha dropped, as OpenCV does on the device), CMYK,
    16-bit and EXIF-rotated images. With ``min_side``, a JPEG at least four times that on both sides is
    decoded at the largest scale of 1/2, 1/4, 1/8 that keeps both sides >= 2 x ``min_side``.

    Raises:
        ValueError: the file is empty, truncated or not an image.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            keep = DRAFT_MARGIN * (min_side or 0)
            if min_side and image.format == "JPEG" and min(image.size) >= 2 * keep:
                image.draft("RGB", (keep, keep))
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
    cache: dict[str, Any] = field(default_factory=dict)  # where it is stored, whether reused, seconds to get it


def pixel_digest(image: np.ndarray) -> str:
    """Identity of an image's content: a hash of its decoded pixels (and shape), so a file re-encoded
    losslessly, renamed or re-saved with other metadata is still the same image."""
    digest = hashlib.blake2b(str(image.shape).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def decode_sample(path: str | os.PathLike, size: int, spec: PreprocessSpec, eval_crop: bool) -> tuple[np.ndarray, str]:
    """One image as a split stores it, and its :func:`pixel_digest`.

    ``eval_crop`` True: exactly the device preprocessing (``prepare``), at ``spec.image_size``; False: the
    shorter side resized to ``size`` and centre-cropped square (the source of random training crops).

    Raises:
        ValueError: the file cannot be decoded.
    """
    image = decode_image(path, spec.resize_size)
    if eval_crop:
        return prepare(image, spec), pixel_digest(image)
    return center_crop(resize_shorter(image, size, spec.interpolation), size), pixel_digest(image)


def decoded(samples: list[Sample], size: int, spec: PreprocessSpec, *, eval_crop: bool, workers: int | None = None,
            window: int = 4) -> Iterator[tuple[Sample, tuple[np.ndarray, str] | str]]:  # fmt: skip
    """``(sample, (stored image, digest))`` or ``(sample, why it is unreadable)`` for every sample, in
    order, decoded by ``workers`` threads (Pillow releases the GIL; None = one per CPU) with at most
    ``window`` images per thread in flight, so memory does not grow with the number of samples."""

    def load(sample: Sample) -> tuple[np.ndarray, str] | str:
        try:
            return decode_sample(sample.path, size, spec, eval_crop)
        except ValueError as exc:
            return str(exc)

    workers = workers or os.cpu_count() or 1
    todo = iter(samples)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[Sample, Any]] = deque()
        for sample in todo:
            pending.append((sample, pool.submit(load, sample)))
            if len(pending) >= workers * window:
                break
        while pending:
            sample, future = pending.popleft()
            following = next(todo, None)
            if following is not None:
                pending.append((following, pool.submit(load, following)))
            yield sample, future.result()
