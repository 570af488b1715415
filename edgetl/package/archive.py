"""The bundle on disk: its folder, swapped in whole, and a byte-for-byte reproducible ``.tar.gz`` (sorted
entries, fixed mtime from ``SOURCE_DATE_EPOCH`` or 1980-01-01, owner 0/0, fixed modes, a gzip header
without a timestamp or file name)."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from edgetl.errors import EdgetlError

DEFAULT_EPOCH = 315532800  # 1980-01-01T00:00:00Z, the earliest time a zip can hold too


def source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return DEFAULT_EPOCH
    try:
        return int(value)
    except ValueError:
        raise EdgetlError(f"SOURCE_DATE_EPOCH must be an integer, got {value!r}") from None


def write_dir(bundle_dir: Path, contents: dict[str, bytes]) -> None:
    """Write the folder beside its final place, then swap it in (never half a bundle)."""
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in bundle_dir.parent.glob(f".{bundle_dir.name}.*"):  # a killed packager's (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.", dir=bundle_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle folder is for everyone to read
    try:
        for rel, data in contents.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        old = bundle_dir.with_name(f".{bundle_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if bundle_dir.exists():
            bundle_dir.rename(old)
        tmp.rename(bundle_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def reproducible_targz(name: str, contents: dict[str, bytes], mtime: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories = sorted({str(Path(name, rel).parent) for rel in contents} | {name})
        for directory in directories:
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            normalise(info, mtime)
            tar.addfile(info)
        for rel in sorted(contents):
            info = tarfile.TarInfo(f"{name}/{rel}")
            info.size, info.mode = len(contents[rel]), 0o644
            normalise(info, mtime)
            tar.addfile(info, io.BytesIO(contents[rel]))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def normalise(info: tarfile.TarInfo, mtime: int) -> None:
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.pax_headers = {}
