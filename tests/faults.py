"""Helpers of the fault-injection suites (test_faults_*.py): run a command, check that it failed the
documented way, and make hostile file systems (full, read-only) where the machine allows it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO

from edgetl.cli import main

ERROR_LINE = re.compile(r"^edgetl(-runtime)?: error: ")


class Outcome:
    """What a command did: exit code, stdout, stderr."""

    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def cli(*args: str) -> Outcome:
    """``edgetl ARGS`` in this process (fast). An exception that escaped the CLI's edge is a failure."""
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"escaped the CLI edge: {result.exception!r}\n{result.stderr}")
    return Outcome(result.exit_code, result.stdout, result.stderr)


def edgetl(*args: str, timeout: float = 300, cwd: Path | None = None) -> Outcome:
    """``edgetl ARGS`` in a fresh process: what a user's shell or a Makefile sees (a crash is a signal)."""
    proc = subprocess.run([sys.executable, "-m", "edgetl", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=_env())  # fmt: skip
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")


def spawn(*args: str) -> subprocess.Popen:
    """``edgetl ARGS`` started in the background (for signals)."""
    return subprocess.Popen([sys.executable, "-m", "edgetl", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())  # fmt: skip


def assert_one_error(outcome: Outcome, code: int, *words: str) -> str:
    """Exit ``code``; stderr has exactly one ``edgetl: error:`` line (holding ``words``), no traceback."""
    assert outcome.code == code, outcome
    lines = [line for line in outcome.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, outcome
    assert "Traceback" not in outcome.stderr and "Traceback" not in outcome.stdout, outcome
    for word in words:
        assert word in lines[0], outcome
    return lines[0]


def temporaries(folder: Path) -> list[Path]:
    """Half-written files: what atomic writes and work folders leave when interrupted."""
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == ".export-work")


def wait_for(condition, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """Every live descendant process of ``pid`` (from the parent ids in Linux's /proc/*/stat)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        kids = [child for child, ppid in parents.items() if ppid == parent]
        found += kids
        queue += kids
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size_kb: int, fill_from: Path | None = None, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size_kb`` at ``where`` (filled with a copy of ``fill_from``), optionally remounted
    read-only. Skips the test where the machine does not let this process mount (not root, no
    CAP_SYS_ADMIN): that is the only portable way to a real full or read-only file system, since
    root ignores permission bits."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) for a size-limited or read-only tmpfs")
    where.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        if fill_from is not None:
            shutil.copytree(fill_from, where, dirs_exist_ok=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def hold_lock(folder: Path, command: str = "export") -> subprocess.Popen:
    """Another process holding ``folder``'s run lock until it is killed."""
    code = ("import sys, time\nfrom edgetl.rundir import run_lock\n"
            f"with run_lock(sys.argv[1], {command!r}):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env=_env())  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=60)


def small_target(folder: Path, size: int = 64, **parity: object) -> str:
    """rpi4-cpu at ``size`` px with the exported_run fixture's loose thresholds (and ``parity`` keys)."""
    from edgetl.targets import load_target

    text = Path(load_target("rpi4-cpu").source).read_text().replace("size = 224", f"size = {size}")
    text = text.replace('name = "rpi4-cpu"', 'name = "rpi4-faults"')
    text = text.replace("max_drop = 1.0", "max_drop = 10.0").replace("min_agreement = 0.98", "min_agreement = 0.85")
    for key, value in parity.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    path = folder / "rpi4-faults.toml"
    path.write_text(text)
    return str(path)


def rehash(root: Path, rel: str) -> None:
    """Make a manifest (a run's or a bundle's) agree with a file someone changed: what an attacker or
    a careless script does, and what hashes alone cannot catch."""
    import hashlib
    import json

    manifest = json.loads((root / "manifest.json").read_text())
    data = (root / rel).read_bytes()
    manifest["files"][rel].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
