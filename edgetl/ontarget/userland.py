"""A board's software on this workstation: a Debian arm64 userland and the bundle's aarch64 wheels,
built once and cached.

The userland is debootstrap's first stage (download + unpack, no configuration), with every downloaded
package unpacked by ``dpkg-deb -x``: enough for qemu-user to run the board's own Python 3.11, with no
chroot, no binfmt and no root beyond what debootstrap itself asks. The wheels are what the board's pip
resolves from ``requirements-device.txt`` for its platform (``pip install --target --platform
manylinux_2_X_aarch64 --only-binary``), their versions recorded. Both are published atomically (built in
a private folder, renamed into place, a ready-marker written last); a folder without its marker, or a
userland whose Python does not start, is never trusted: it is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl.errors import EdgetlError, MissingDependencyError, os_error_message
from edgetl.rundir import atomic_write

log = logging.getLogger(__name__)

ROOT_ENV = "EDGETL_EMULATION_DIR"
MIRROR_ENV = "EDGETL_DEBIAN_MIRROR"
MARKER = "edgetl-ready.json"
DEBIAN_PACKAGES = "qemu-user-static debootstrap"


@dataclass(frozen=True)
class Userland:
    """A distribution release for one architecture: what ``[device] userland`` names."""

    distro: str  # "debian"
    suite: str  # "bookworm"
    arch: str  # Debian's name: "arm64"
    python: str  # the interpreter in it: "3.11"

    @classmethod
    def parse(cls, name: str) -> Userland:
        known = {"debian-bookworm-arm64": cls("debian", "bookworm", "arm64", "3.11")}
        if name not in known:
            raise EdgetlError(f"unknown userland {name!r}: edgetl can build {', '.join(known)}")
        return known[name]

    @property
    def name(self) -> str:
        return f"{self.distro}-{self.suite}-{self.arch}"

    @property
    def qemu_arch(self) -> str:
        return {"arm64": "aarch64"}[self.arch]

    @property
    def pip_platforms(self) -> list[str]:
        """The wheel platforms its pip accepts: manylinux up to its glibc (bookworm: 2.36)."""
        glibc = {"bookworm": 36}[self.suite]
        return [f"manylinux_2_{minor}_{self.qemu_arch}" for minor in range(glibc, 16, -1)] + \
            [f"manylinux2014_{self.qemu_arch}"]  # fmt: skip


class SetupError(EdgetlError):
    """The board's software could not be built (no network for the packages or wheels, a full disk)."""


def emulation_root() -> Path:
    """Where userlands and wheels live: ``$EDGETL_EMULATION_DIR``, else the user's edgetl cache folder."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgetl" / "emulation"


def find_tool(*names: str) -> str | None:
    return next((found for name in names if (found := shutil.which(name))), None)


def require_tools(qemu_arch: str = "aarch64") -> str:
    """The qemu-user binary; MissingDependencyError (exit 5) naming the Debian packages when a tool is missing."""
    qemu = find_tool(f"qemu-{qemu_arch}-static", f"qemu-{qemu_arch}")
    missing = [n for n, ok in ((f"qemu-{qemu_arch}-static", qemu), ("debootstrap", find_tool("debootstrap")),
                               ("dpkg-deb", find_tool("dpkg-deb"))) if not ok]  # fmt: skip
    if missing:
        raise MissingDependencyError(
            f"checking on the target's CPU needs {', '.join(missing)}, which this machine lacks",
            hint=f"install Debian's packages: apt-get install {DEBIAN_PACKAGES}; or package with --no-on-target",
        )
    return qemu


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per cache entry (the kernel drops the lock if the builder dies)."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a+b")  # noqa: SIM115 - held for the block
    except OSError as exc:
        raise SetupError(f"cannot use the emulation cache: {os_error_message(exc)}",
                         hint=f"point {ROOT_ENV} at a writable folder") from None  # fmt: skip
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _ready(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _publish(tmp: Path, folder: Path, marker: dict[str, Any]) -> None:
    atomic_write(tmp / MARKER, json.dumps(marker, sort_keys=True, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)


def _run(command: list[str], what: str, hint: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a setup step; a failure is one SetupError line with the tool's last words."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", **kwargs)
    except OSError as exc:
        raise SetupError(f"{what}: {os_error_message(exc)}", hint=hint) from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if "error" in line.lower() or line.startswith("E:")),
                    lines[-1] if lines else f"exit {done.returncode}")  # fmt: skip
        raise SetupError(f"{what}: {said.strip()[:300]}", hint=hint)
    return done


def python_runs(root: Path, qemu: str, python: str) -> bool:
    """Whether the userland's Python starts under qemu (a damaged or half-copied one does not)."""
    binary = root / "usr" / "bin" / f"python{python}"
    if not binary.is_file():
        return False
    try:
        done = subprocess.run([qemu, "-L", str(root), str(binary), "-S", "-c", "import encodings, json; print(42)"],
                              capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip() == "42"


def ensure_userland(userland: Userland, qemu: str) -> Path:
    """The userland's folder, built on first use (a few hundred MB, ~30 s with a fast mirror).

    Raises:
        SetupError: debootstrap could not fetch or unpack the packages.
    """
    folder = emulation_root() / f"userland-{userland.name}-py{userland.python}"
    if _ready(folder) and python_runs(folder, qemu, userland.python):
        return folder
    with _locked(folder):
        if _ready(folder) and python_runs(folder, qemu, userland.python):
            return folder  # another process built it while we waited
        if folder.exists():
            log.warning("the emulated userland in %s is incomplete or broken; building it again", folder)
        _build_userland(userland, folder)
        if not python_runs(folder, qemu, userland.python):
            raise SetupError(f"the {userland.name} userland in {folder} was built but its Python does not start",
                             hint=f"remove {folder} and try again")  # fmt: skip
    return folder


def _build_userland(userland: Userland, folder: Path) -> None:
    mirror = os.environ.get(MIRROR_ENV, "http://deb.debian.org/debian")
    tmp = Path(tempfile.mkdtemp(prefix="tmp-userland-", dir=folder.parent))
    try:
        log.info("building the %s userland (debootstrap, first stage) in %s", userland.name, folder)
        prefix = [] if os.geteuid() == 0 else ([find_tool("fakeroot")] if find_tool("fakeroot") else [])
        packages = f"python{userland.python},python3-minimal"
        _run([*prefix, "debootstrap", "--foreign", f"--arch={userland.arch}", "--variant=minbase",
              f"--include={packages}", userland.suite, str(tmp / "root"), mirror],
             f"debootstrap could not fetch {userland.name} from {mirror}",
             f"the first on-target check needs Debian's package mirror ({MIRROR_ENV} names another); "
             "later checks reuse the userland")  # fmt: skip
        root = tmp / "root"
        debs = sorted((root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
        for deb in debs:  # the second stage's configuration is not needed to run Python under qemu-user
            _run(["dpkg-deb", "-x", str(deb), str(root)], f"cannot unpack {deb.name}", "check the free disk space")
            deb.unlink()
        for empty in ("tmp", "root", "home", "mnt", "media", "srv", "opt", "run"):
            # qemu -L looks a guest path up under the userland first: an empty /tmp there would hide the
            # host's /tmp (where bundles and images may be) from the emulated process
            with contextlib.suppress(OSError):
                (root / empty).rmdir()
        marker = {"userland": userland.name, "python": userland.python, "mirror": mirror, "packages": len(debs)}
        _publish(root, folder, marker)
    except OSError as exc:
        raise SetupError(f"cannot build the userland in {folder}: {os_error_message(exc)}",
                         hint="check the free disk space") from None  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_wheels(requirements: list[str], userland: Userland) -> tuple[Path, dict[str, str]]:
    """The board's site-packages for ``requirements`` and the versions pip resolved (cached by content).

    Raises:
        SetupError: pip could not resolve or download the wheels (no network, no wheel for the platform).
    """
    key = hashlib.sha256(json.dumps([sorted(requirements), userland.pip_platforms]).encode()).hexdigest()[:16]
    folder = emulation_root() / f"wheels-{userland.qemu_arch}-cp{userland.python.replace('.', '')}-{key}"
    marker = _ready(folder)
    if marker and (folder / "site").is_dir():
        return folder / "site", marker["versions"]
    with _locked(folder):
        marker = _ready(folder)
        if marker and (folder / "site").is_dir():
            return folder / "site", marker["versions"]
        tmp = Path(tempfile.mkdtemp(prefix="tmp-wheels-", dir=folder.parent))
        try:
            versions = _install_wheels(requirements, userland, tmp / "site")
            _publish(tmp, folder, {"requirements": sorted(requirements), "versions": versions})
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / "site", versions


def _install_wheels(requirements: list[str], userland: Userland, site: Path) -> dict[str, str]:
    platforms = [arg for p in userland.pip_platforms for arg in ("--platform", p)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_TARGET", "PIP_PREFIX")}
    log.info("resolving the board's wheels for %s: %s", userland.name, ", ".join(requirements))
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-q", "--target",
          str(site), *platforms, "--python-version", userland.python, "--implementation", "cp",
          "--only-binary=:all:", *requirements],
         f"cannot fetch the {userland.qemu_arch} wheels of {', '.join(requirements)}",
         "the first on-target check needs the package index (pip); later checks reuse the wheels", env=env)  # fmt: skip
    versions = {}
    for info in site.glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].rpartition("-")
        versions[name.lower().replace("_", "-")] = version
    return dict(sorted(versions.items()))
