"""``edgetl verify``: re-hash a bundle (folder or ``.tar.gz``) against its manifest."""

from __future__ import annotations

import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.errors import EdgetlError, ExitCode, first_line
from edgetl.runtime.bundle import BundleError, verify_bundle


@dataclass
class VerifyReport:
    """What ``edgetl verify`` found: nothing (ok) or the problems, each one line."""

    bundle: str
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.VERIFY_FAILED if self.problems else ExitCode.OK

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "ok": not self.problems, "problems": self.problems}


def verify_report(bundle: str) -> VerifyReport:
    """:func:`verify` as a report."""
    return VerifyReport(bundle, verify(bundle))


def verify(bundle: str) -> list[str]:
    """Problems found (empty: intact).

    Raises:
        EdgetlError: the path is not a bundle at all (a missing path, a truncated or non-gzip archive,
            an archive without exactly one bundle folder).
    """
    import zlib

    path = Path(bundle)
    try:
        if path.is_dir():
            return verify_bundle(path)
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            with tempfile.TemporaryDirectory() as tmp, tarfile.open(path, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
                roots = [p for p in Path(tmp).iterdir() if p.is_dir()]
                if len(roots) != 1:
                    raise BundleError(f"{path} should hold one bundle folder, found {len(roots)}")
                return verify_bundle(roots[0])
    except BundleError as exc:
        raise EdgetlError(first_line(exc)) from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:  # truncated, not gzip, not tar
        kind = "bundle folder" if path.is_dir() else "bundle archive"
        raise EdgetlError(f"{path} is not a readable {kind}: {first_line(exc)}", hint="copy it again") from None
    if not path.exists():
        raise EdgetlError(f"{bundle} does not exist")
    raise EdgetlError(f"{bundle} is neither a bundle folder nor a .tar.gz")
