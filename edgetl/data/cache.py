"""The decoded-image cache: each split decoded once, kept on disk, memory-mapped by every process.

An entry is one split of one dataset under one preprocessing: a raw uint8 array ``[N, S, S, 3]``
(``images.u8``) and ``meta.json`` (which samples it holds, labels, pixel digests, unreadable files; paths
are the caller's, so a process in another working folder names the files its own way). Its name is a hash of
the decoder, the preprocessing, and every sample's absolute path, size, modification time and label,
so a changed, added, removed or relabelled file gives a new entry (the quick check of rsync and make:
a file rewritten with the same size and modification time is not noticed). Every time an entry is
opened its metadata and the hash of every stored image are checked (:mod:`edgetl.data.cache_meta`): a
damaged entry is rebuilt with a warning naming it, never used.

Building streams decoded images from a bounded pool (:func:`edgetl.data.decode.decoded`) straight
into a preallocated file in a private folder, then publishes the folder with one ``rename``: an entry
either is complete or does not exist, and a builder killed half way leaves only a private folder that
the next builder of that entry removes. One builder per entry at a time (a ``flock`` on
``<key>.lock``): other processes of the host (DDP ranks, a second run) wait for it and map what it
wrote, so N processes hold one copy, in the page cache, not N copies in their own memory.

Location: ``--cache-dir``, else ``$EDGETL_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgetl/images`` (or
``~/.cache/edgetl/images``). ``edgetl cache ls`` / ``verify`` / ``clear`` show, check and empty it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.data.cache_meta import damaged_rows, meta_problem, row_digest, samples_problem
from edgetl.data.decode import LoadedSplit, decoded
from edgetl.data.folders import Sample
from edgetl.errors import DataError, first_line, os_error_message, raise_if_interrupted
from edgetl.rundir import try_flock
from edgetl.runtime.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

CACHE_ENV = "EDGETL_CACHE_DIR"
FORMAT = 3  # bump when the entry layout or the decoder's output changes
DECODER = "pillow-draft-2x"  # the decoder's behaviour (edgetl.data.decode), part of every key
IMAGES, META, TMP_PREFIX = "images.u8", "meta.json", "tmp-"


def cache_root() -> Path:
    """Where entries live: ``$EDGETL_CACHE_DIR``, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgetl" / "images"


def entry_key(samples: list[Sample], size: int, spec: PreprocessSpec, eval_crop: bool) -> str:
    """The entry's name: a hash of what decides its pixels and of each file's identity on disk."""
    setup = {"format": FORMAT, "decoder": DECODER, "mode": "eval" if eval_crop else "train", "size": size,
             "preprocess": spec.to_dict()}  # fmt: skip
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True).encode())
    for sample in samples:
        try:
            stat = os.stat(sample.path)
            seen = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:
            seen = "missing"
        digest.update(f"\n{os.path.abspath(sample.path)}\0{seen}\0{sample.label}".encode())
    return digest.hexdigest()[:32]


def load_split(
    samples: list[Sample],
    size: int,
    spec: PreprocessSpec,
    *,
    eval_crop: bool,
    workers: int | None = None,
    skipped: list[dict[str, str]] | None = None,
    progress: Callable[[int], None] | None = None,
    root: str | os.PathLike | None = None,
) -> LoadedSplit:
    """The split decoded (see :func:`edgetl.data.decode.decode_sample`), from the cache, built first
    if needed. ``images`` is a copy-on-write memory map of the entry.

    Args:
        samples, size, spec, eval_crop: what to decode and how.
        workers: decoding threads; None = one per CPU.
        skipped: unreadable files are appended here as ``{"path", "reason"}`` (also when reused).
        progress: called with the number of images done while building.
        root: the cache folder; None = :func:`cache_root`.

    Raises:
        DataError: no sample could be decoded; the cache folder cannot be written or its disk is full.
    """
    side = spec.image_size if eval_crop else size
    if not samples:
        return LoadedSplit(np.zeros((0, side, side, 3), np.uint8), np.zeros(0, np.int64), [], [])
    started = time.perf_counter()
    root = Path(root) if root is not None else cache_root()
    key = entry_key(samples, size, spec, eval_crop)
    opened, reused = _open(root / key, key, samples), True
    if not isinstance(opened, tuple):
        with _entry_lock(root, key):
            opened = _open(root / key, key, samples)  # another process may have built it while we waited
            if not isinstance(opened, tuple):
                if opened is not None:
                    log.warning("the image cache entry %s is damaged (%s): rebuilding it", root / key, opened)
                _build(root, key, samples, size, spec, eval_crop, workers, progress)
                opened, reused = _open(root / key, key, samples, verify=False), False
    if not isinstance(opened, tuple):
        raise DataError(f"the image cache entry {root / key} could not be read back after building it ({opened})")
    loaded = _split(*opened, samples)
    for item in loaded.cache.pop("skipped"):
        log.warning("skipping unreadable image %s: %s", item["path"], item["reason"])
        if skipped is not None:
            skipped.append(item)
    loaded.cache.update(entry=str(root / key), reused=reused, seconds=time.perf_counter() - started)
    return loaded


Opened = tuple[np.ndarray, dict[str, Any]]


def _open(entry: Path, key: str, samples: list[Sample], verify: bool = True) -> Opened | str | None:
    """The published entry's images and metadata; None if there is no entry; else why the entry there
    cannot be used (see :func:`_checked`)."""
    return _checked(entry, key, samples, verify) if entry.is_dir() else None


def _checked(entry: Path, key: str, samples: list[Sample] | None, verify: bool) -> Opened | str:
    """The entry's images (a copy-on-write map) and metadata, or why it cannot be used: files missing or
    unreadable, metadata malformed, foreign or (given the caller's ``samples``) not about them, a size
    that does not match, and with ``verify`` an image whose hash changed (:mod:`edgetl.data.cache_meta`)."""
    try:
        meta = json.loads((entry / META).read_text())
        size = (entry / IMAGES).stat().st_size
    except FileNotFoundError as exc:
        return f"{Path(exc.filename or '').name or 'a file'} is missing"
    except (OSError, ValueError, RecursionError) as exc:
        return f"its files cannot be read: {first_line(exc)}"
    problem = meta_problem(meta, key=key, file_size=size, fmt=FORMAT)
    problem = problem or (samples_problem(meta, samples) if samples is not None else None)
    if problem:
        return problem
    images = np.memmap(entry / IMAGES, np.uint8, "c", shape=(meta["count"], meta["side"], meta["side"], 3))
    bad = damaged_rows(images, meta["rows"]) if verify else []
    if bad:
        first = f", first {samples[meta['kept'][bad[0]]].path}" if samples is not None else ""
        return f"{len(bad)} of {len(images)} stored images no longer match their hash{first}"
    return images, meta


def _split(images: np.ndarray, meta: dict[str, Any], samples: list[Sample]) -> LoadedSplit:
    """An opened entry as the caller's split, its files named as the caller names them."""
    skipped = [{"path": str(samples[item["index"]].path), "reason": item["reason"]} for item in meta["skipped"]]
    return LoadedSplit(images=images, labels=np.asarray([samples[i].label for i in meta["kept"]], np.int64),
                       paths=[str(samples[i].path) for i in meta["kept"]], digests=list(meta["digests"]),
                       cache={"skipped": skipped})  # fmt: skip


@contextlib.contextmanager
def _entry_lock(root: Path, key: str) -> Iterator[None]:
    """Hold ``<root>/<key>.lock`` exclusively (released by the kernel if the process dies)."""
    import fcntl

    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / f"{key}.lock", "a+b")  # noqa: SIM115 - held for the block below
    except OSError as exc:
        raise _cache_error(exc, root) from None
    with handle:
        if try_flock(handle) is False:
            log.info("waiting for another process to finish decoding into %s", root / key)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build(root: Path, key: str, samples: list[Sample], size: int, spec: PreprocessSpec, eval_crop: bool,
           workers: int | None, progress: Callable[[int], None] | None) -> None:  # fmt: skip
    """Decode into a private folder and publish it as ``root/key`` (the caller holds the entry's lock)."""
    side = spec.image_size if eval_crop else size
    row = side * side * 3
    for stale in [root / key, *root.glob(f"{TMP_PREFIX}{key}-*")]:  # a broken entry, folders of killed builders
        shutil.rmtree(stale, ignore_errors=True)
    _refuse_full_disk(root, len(samples) * row)
    tmp = root / f"{TMP_PREFIX}{key}-{os.getpid()}-{secrets.token_hex(4)}"
    started = time.perf_counter()
    try:
        tmp.mkdir()
        meta = _write_images(tmp / IMAGES, samples, size, spec, eval_crop, workers, progress, row)
        meta.update(format=FORMAT, key=key, side=side, mode="eval" if eval_crop else "train", complete=True,
                    preprocess=spec.to_dict(), decode_seconds=round(time.perf_counter() - started, 3))  # fmt: skip
        _write_synced(tmp / META, json.dumps(meta).encode())
        _publish(tmp, root / key, samples)
    except OSError as exc:
        raise _cache_error(exc, root) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("decoded %d images into the cache in %.1fs: %s", meta["count"], meta["decode_seconds"], root / key)


def _write_images(path: Path, samples: list[Sample], size: int, spec: PreprocessSpec, eval_crop: bool,
                  workers: int | None, progress: Callable[[int], None] | None, row: int) -> dict[str, Any]:  # fmt: skip
    """Append each decoded image to ``path`` as it comes; the entry's metadata (without its key)."""
    labels: list[int] = []
    kept: list[int] = []
    digests: list[str] = []
    rows: list[str] = []
    skipped: list[dict[str, Any]] = []
    with open(path, "wb") as out:
        with contextlib.suppress(OSError, AttributeError):  # reserve the space now: ENOSPC here, not later
            os.posix_fallocate(out.fileno(), 0, len(samples) * row)
        for index, (sample, result) in enumerate(decoded(samples, size, spec, eval_crop=eval_crop, workers=workers)):
            if isinstance(result, str):
                skipped.append({"index": index, "reason": result})
            else:
                out.write(np.ascontiguousarray(result[0]).data)
                rows.append(row_digest(result[0]))
                labels.append(sample.label)
                kept.append(index)
                digests.append(result[1])
            if progress is not None:
                progress(index + 1)
        if not labels:
            examples = "; ".join(f"{samples[s['index']].path}: {s['reason']}" for s in skipped[:2])
            raise DataError(f"none of the {len(samples)} images could be decoded", hint=examples)
        out.truncate(len(labels) * row)
        out.flush()
        os.fsync(out.fileno())
    first = os.path.abspath(samples[kept[0]].path)  # for edgetl cache ls
    return {"count": len(labels), "labels": labels, "kept": kept, "digests": digests, "rows": rows, "skipped": skipped,
            "first": first}


def _publish(tmp: Path, entry: Path, samples: list[Sample]) -> None:
    """Rename the finished folder into place; an entry that appeared meanwhile (a builder that took a
    lock file ``edgetl cache clear`` had just removed) is as good as ours."""
    raise_if_interrupted()
    try:
        os.rename(tmp, entry)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not isinstance(_open(entry, entry.name, samples), tuple):
            raise
    _fsync_dir(entry.parent)


def _refuse_full_disk(root: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(root).free
    except OSError as exc:
        raise _cache_error(exc, root) from None
    if needed > free:
        raise DataError(f"the image cache needs {needed / 2**20:,.0f} MiB in {root}, but its disk has "
                        f"{free / 2**20:,.0f} MiB free", hint=SPACE_HINT)  # fmt: skip


SPACE_HINT = f"free space (edgetl cache clear), or point --cache-dir or {CACHE_ENV} at a larger disk"


def _cache_error(exc: OSError, root: Path) -> DataError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DataError(f"the disk holding the image cache {root} is full ({os_error_message(exc)})", hint=SPACE_HINT)
    return DataError(f"cannot write the image cache in {root}: {os_error_message(exc)}",
                     hint=f"point --cache-dir or {CACHE_ENV} at a writable folder")  # fmt: skip


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- edgetl cache ls / verify / clear


def entries(root: str | os.PathLike | None = None, *, verify: bool = False) -> list[dict[str, Any]]:
    """The published entries (newest first) and the leftovers of interrupted builds. ``state`` is ok,
    unfinished or damaged (with ``problem``); ``verify`` also hashes every stored image (slow: reads all)."""
    root = Path(root) if root is not None else cache_root()
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir():
            continue
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        item: dict[str, Any] = {"entry": path.name, "bytes": size, "modified": path.stat().st_mtime}
        if path.name.startswith(TMP_PREFIX):
            item["state"] = "unfinished"
        else:
            item.update(_entry_state(path, verify))
        found.append(item)
    return sorted(found, key=lambda item: -item["modified"])


def _entry_state(path: Path, verify: bool) -> dict[str, Any]:
    opened = _checked(path, path.name, None, verify)
    if isinstance(opened, str):
        return {"state": "damaged", "problem": opened}
    meta = opened[1]
    return {"state": "ok", "images": meta["count"], "side": meta["side"], "mode": meta["mode"], "first": meta["first"]}


def clear(root: str | os.PathLike | None = None, *, only: set[str] | None = None) -> dict[str, Any]:
    """Remove every entry (or those named in ``only``) not being built right now (a mapped entry stays
    readable to the process that maps it until it exits). Returns what was removed and what was left."""
    root = Path(root) if root is not None else cache_root()
    removed, busy, freed = [], [], 0
    for item in entries(root):
        if only is not None and item["entry"] not in only:
            continue
        key = item["entry"].removeprefix(TMP_PREFIX).split("-")[0]
        lock = root / f"{key}.lock"
        with open(lock, "a+b") as handle:
            if not try_flock(handle):
                busy.append(item["entry"])
                continue
            shutil.rmtree(root / item["entry"], ignore_errors=True)
            lock.unlink(missing_ok=True)
        removed.append(item["entry"])
        freed += item["bytes"]
    return {"root": str(root), "removed": removed, "busy": busy, "bytes_freed": freed}
