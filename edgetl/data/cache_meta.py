"""What makes a decoded-image cache entry trustworthy: a well-formed ``meta.json`` that agrees with the
caller's samples, and pixels that still hash to what was written.

Every entry records a SHA-256 of each stored image (``rows``). An entry is checked every time it is
opened: its metadata field by field (any JSON shape, any index, any label a damaged or hand-edited file
can hold) and every image's hash, in threads (hashlib releases the GIL), so a file overwritten in place
(same size, zeros, a flipped byte) is noticed, not trained on. Verifying 3,000 images of 256 px costs
about 0.2 s on a 2-core CPU (``benchmarks/results/cache_verify.md``).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from edgetl.data.folders import Sample

ROW_DIGEST_CHARS = 32  # hex characters of each image's SHA-256 kept in meta.json


def row_digest(image: np.ndarray) -> str:
    """The stored image's hash as meta.json records it."""
    return hashlib.sha256(np.ascontiguousarray(image).data).hexdigest()[:ROW_DIGEST_CHARS]


def damaged_rows(images: np.ndarray, digests: list[str], workers: int | None = None) -> list[int]:
    """Indices of the stored images whose hash is not the recorded one."""
    workers = max(1, min(8, workers or os.cpu_count() or 1))
    chunk = max(1, -(-len(images) // (workers * 4)))

    def check(start: int) -> list[int]:
        stop = min(start + chunk, len(images))
        return [i for i in range(start, stop) if row_digest(images[i]) != digests[i]]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [i for found in pool.map(check, range(0, len(images), chunk)) for i in found]


def _ints(value: Any, count: int | None = None) -> bool:
    return (isinstance(value, list) and (count is None or len(value) == count)
            and all(type(v) is int for v in value))  # fmt: skip


def _strings(value: Any, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(isinstance(v, str) for v in value)


def meta_problem(meta: Any, *, key: str | None, file_size: int | None, fmt: int) -> str | None:
    """Why ``meta`` cannot describe a complete entry (None: it can), without the caller's samples."""
    if not isinstance(meta, dict):
        return f"meta.json holds a {type(meta).__name__}, not an object"
    if meta.get("format") != fmt:
        return f"meta.json is format {meta.get('format')!r}, this edgetl writes {fmt}"
    if key is not None and meta.get("key") != key:
        return "meta.json belongs to another entry"
    if meta.get("complete") is not True:
        return "meta.json does not mark the entry complete"
    count, side = meta.get("count"), meta.get("side")
    if type(count) is not int or type(side) is not int or count < 1 or side < 1:
        return "meta.json has no valid image count and side"
    if file_size is not None and file_size != count * side * side * 3:
        return f"images.u8 holds {file_size:,} bytes, meta.json says {count} x {side}px ({count * side * side * 3:,})"
    if not (_ints(meta.get("labels"), count) and _ints(meta.get("kept"), count)
            and _strings(meta.get("digests"), count) and _strings(meta.get("rows"), count)):  # fmt: skip
        return "meta.json's per-image lists (labels, kept, digests, rows) are malformed"
    skipped = meta.get("skipped")
    if not isinstance(skipped, list) or not all(
        isinstance(s, dict) and type(s.get("index")) is int and isinstance(s.get("reason"), str) for s in skipped
    ):
        return "meta.json's list of unreadable files is malformed"
    if not isinstance(meta.get("first"), str) or meta.get("mode") not in ("train", "eval"):
        return "meta.json has no valid first file or split kind"
    return None


def samples_problem(meta: dict[str, Any], samples: list[Sample]) -> str | None:
    """Why a well-formed ``meta`` does not describe ``samples`` (None: it does): every sample is kept or
    skipped exactly once, in order, and each kept image carries the label the caller gives it."""
    kept, skipped = meta["kept"], [s["index"] for s in meta["skipped"]]
    if sorted(kept + skipped) != list(range(len(samples))) or kept != sorted(kept):
        return f"meta.json's sample indices do not cover the {len(samples)} samples once each"
    labels = [samples[i].label for i in kept]
    if labels != meta["labels"]:
        wrong = sum(a != b for a, b in zip(labels, meta["labels"], strict=True))
        return f"meta.json gives {wrong} image(s) a label their folder does not"
    return None
