"""Atomic file writes and the run directory's manifest.

Every file a stage writes goes through :func:`atomic_write` (temp file in the same directory, fsync,
``os.replace``), so an interrupted run never leaves a half-written file under its final name.
``manifest.json`` lists every artifact with its sha256 and size; later stages add their own section,
and a step that consumes an artifact can check it is the one the manifest describes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgetl import __version__
from edgetl.errors import RunDirError, RunLocked, raise_if_interrupted, writing_into

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
# The checkpoints a run's exports come from: the float model and, in a QAT run (edgetl.quantize.qat), the
# quantisation-aware weights its quantised models are built from.
MODEL = "model.pt"
QAT_WEIGHTS = "model_qat.pt"
# The exported models a run can hold, in report order: file -> (format, precision).
ARTIFACTS = {
    "model.onnx": ("onnx", "float32"),
    "model_float32.tflite": ("tflite", "float32"),
    "model_int8.tflite": ("tflite", "int8"),
    "model_int16x8.tflite": ("tflite", "int16x8"),
}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; artifacts get normal permissions
    try:
        with writing_into(path):
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        raise_if_interrupted()  # a Ctrl-C that Python swallowed still publishes nothing
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


LOCK_NAME = ".edgetl.lock"
_held_locks: dict[Path, int] = {}  # folders this process holds the lock of, and how deeply


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, command: str, wait: float = 0) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (created if needed) while a command writes into it.

    A second edgetl process that wants the same folder is refused at once instead of interleaving
    its writes (two exports of one run would corrupt each other's log and work folder). The lock is
    an ``flock`` on ``folder/.edgetl.lock``: the kernel drops it when the holder exits, even by
    SIGKILL, so a crashed run never leaves a stale lock behind. Inside the lock, temporary files that
    a killed writer left (``.NAME.*.tmp``) are removed: nobody else can be writing them.

    ``wait``: seconds to wait for another holder to let go first (0: refuse at once).

    Raises:
        RunLocked: another process holds the lock (its command and pid are named), after ``wait``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held_locks:  # this process holds it already (export -> check): re-entrant
        _held_locks[key] += 1
        try:
            yield folder
        finally:
            _held_locks[key] -= 1
        return
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while not try_flock(fd):
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                hint = "wait for it to finish; two commands never write one folder at once"
                raise RunLocked(f"{folder} is in use by {holder}", hint=hint)
            time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"edgetl {command} (pid {os.getpid()})\n".encode(), 0)
        sweep_temporaries(folder)
        _held_locks[key] = 1
        try:
            yield folder
        finally:
            del _held_locks[key]
    finally:
        os.close(fd)  # releases the flock


def try_flock(fd: Any) -> bool:
    """Take an exclusive ``flock`` on ``fd`` (a descriptor or an open file) without waiting: False when
    another process holds it. The kernel releases it when the process dies."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove what :func:`atomic_path` leaves when its process is killed (``.NAME.XXXX.tmp``), in
    ``folder`` and the folders below it. Only call it while holding :func:`run_lock`."""
    removed = []
    for path in Path(folder).rglob(".*.tmp"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def dumps_json(obj: Any) -> str:
    """The one JSON style of edgetl's artifacts: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, dumps_json(obj))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a run directory's manifest, or an empty one if there is none yet."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.exists():
        return {"schema_version": MANIFEST_SCHEMA_VERSION, "files": {}, "stages": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from None
    version = manifest.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise RunDirError(
            f"{path} has schema_version {version!r}; this edgetl reads {MANIFEST_SCHEMA_VERSION}",
            hint="re-run the stage that wrote it with this edgetl version",
        )
    return manifest


def update_manifest(
    run_dir: str | os.PathLike, stage: str, files: list[str], info: dict[str, Any], top: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Record a stage's files (paths relative to ``run_dir``) and summary in the manifest (and the
    top-level keys in ``top``, records that outlive any one stage, like ``parity_history``).

    Hashes are computed from the files as they are on disk now, so call this after they are written.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    manifest["edgetl_version"] = __version__
    for rel in files:
        entry = file_entry(run_dir / rel)
        entry["stage"] = stage
        manifest["files"][rel] = entry
    manifest["stages"][stage] = info
    manifest.update(top or {})
    write_json(run_dir / MANIFEST_NAME, manifest)
    return manifest


def bundle_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of the edgetl bundle in ``folder``; None when there is none (or it is unreadable)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("kind") == "edgetl-bundle" else None


def run_bundles(run_dir: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """The bundles ``edgetl package`` wrote into ``RUN/bundles`` (its default ``--out``): (folder, manifest)."""
    found = [(folder, bundle_manifest(folder)) for folder in sorted((Path(run_dir) / "bundles").glob("*/"))]
    return [(folder, manifest) for folder, manifest in found if manifest is not None]


def verify_files(run_dir: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    """Return the manifest entries whose file is missing or whose sha256 differs."""
    run_dir = Path(run_dir)
    bad = []
    for rel, entry in sorted(manifest.get("files", {}).items()):
        path = run_dir / rel
        if not path.is_file() or not isinstance(entry, dict) or sha256_file(path) != entry.get("sha256"):
            bad.append(rel)
    return bad
