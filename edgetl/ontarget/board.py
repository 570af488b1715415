"""A real board over ssh: copy the bundle (and, for parity, the images and the host's input crops),
make or reuse a virtualenv on the board from the bundle's ``requirements-device.txt``, run the
runtime's ``scores`` or ``bench`` there, and bring its JSON back.

HOST is anything the system ``ssh`` accepts (``pi@raspberrypi.local``, a ``~/.ssh/config`` alias);
``$EDGETL_SSH_CONFIG`` names another ssh config file (``ssh -F``). ssh runs in batch mode: a key, not
a password prompt. Everything edgetl puts on the board lives under ``~/.cache/edgetl-board/``; the
virtualenv (one per requirements set) is kept for the next run, each run's folder is removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import subprocess
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import Interrupted
from edgetl.ontarget.emulate import DeviceRunError, DeviceScores, collect, how_it_ended

CONFIG_ENV = "EDGETL_SSH_CONFIG"
BASE = "${EDGETL_BOARD_HOME:-$HOME/.cache/edgetl-board}"  # on the board (the variable: tests)
NO_PYTHON = 97  # the remote script's exit status when the board has no python3


def ssh_base(host: str) -> list[str]:
    config = ["-F", os.environ[CONFIG_ENV]] if os.environ.get(CONFIG_ENV) else []
    return ["ssh", *config, "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", host]


def remote(host: str, script: str, *, stdin: bytes | None = None, timeout: float = 600,
           what: str = "run") -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``script`` with the board's /bin/sh; DeviceRunError (one line) when ssh or the script fails."""
    try:
        done = subprocess.run([*ssh_base(host), f"/bin/sh -c {shlex.quote(script)}"], input=stdin, capture_output=True,
                              timeout=timeout)  # fmt: skip
    except FileNotFoundError:
        raise DeviceRunError("no ssh client on this machine", hint="apt-get install openssh-client") from None
    except subprocess.TimeoutExpired:
        raise DeviceRunError(f"{host} did not finish the {what} within {timeout:.0f} s") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while the {what} ran on {host}; nothing was recorded") from None
    stderr = done.stderr.decode(errors="replace")
    if done.returncode == 255:
        said = [line for line in stderr.splitlines() if line.strip() and not line.startswith("Warning")]
        raise DeviceRunError(f"cannot reach {host} over ssh: {said[-1].strip() if said else 'ssh failed'}",
                             hint="check the host name, that the board is on, and that `ssh HOST` logs in "
                                  "with a key (batch mode: no password prompt)")  # fmt: skip
    if done.returncode == NO_PYTHON:
        raise DeviceRunError(f"{host} has no python3",
                             hint="install Python 3.9+ on the board (apt install python3-venv)")
    if done.returncode != 0:
        raise DeviceRunError(f"the {what} on {host} {how_it_ended(done.returncode, stderr)}")
    return done


def _payload(bundle: Path, paths: list[str], host_inputs: np.ndarray | None) -> bytes:
    """A tar of the bundle (as ``bundle/``) and, for parity, the images (renamed in list order), their
    list and the host's input crops."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.add(bundle, arcname="bundle")
        if host_inputs is not None:
            names = [f"images/{i:06d}{Path(p).suffix.lower()}" for i, p in enumerate(paths)]
            for path, name in zip(paths, names, strict=True):
                tar.add(path, arcname=name)
            listing = "".join(f"{n}\n" for n in names).encode()
            for name, data in (("images.txt", listing), ("inputs.npy", _npy(host_inputs))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, np.uint8))
    return buffer.getvalue()


def _session(host: str, bundle: Path, payload: bytes) -> tuple[str, str]:
    """Copy the payload and make sure the board's virtualenv exists: (run folder, venv python)."""
    key = hashlib.sha256((bundle / "requirements-device.txt").read_bytes()).hexdigest()[:12]
    run, venv = f"{BASE}/run-{uuid.uuid4().hex[:12]}", f"{BASE}/venv-{key}"
    remote(host, f"command -v python3 >/dev/null || exit {NO_PYTHON}; mkdir -p {run} && tar xf - -C {run}",
           stdin=payload, what="copy")  # fmt: skip
    remote(host, f"""set -e
if [ ! -f {venv}/.edgetl-ready ]; then
  rm -rf {venv}; python3 -m venv {venv}
  {venv}/bin/python -m pip install --disable-pip-version-check -q -r {run}/bundle/requirements-device.txt
  touch {venv}/.edgetl-ready
fi""", timeout=1800, what="install of the bundle's requirements")  # fmt: skip
    return run, f"{venv}/bin/python"


def run_on_board(host: str, bundle: Path, paths: list[str], host_inputs: np.ndarray,
                 cpu_model: bool = False) -> DeviceScores:  # fmt: skip
    """The bundle's runtime on the board ``host`` over ssh, on ``paths`` (host crops ``host_inputs``)."""
    started = time.perf_counter()
    run, python = _session(host, bundle, _payload(bundle, paths, host_inputs))
    try:
        done = remote(host, f"cd {run} && PYTHONPATH=bundle {python} -m edgetl_runtime scores bundle --list images.txt "
                            f"--inputs inputs.npy --threads 1{' --cpu' if cpu_model else ''}",
                      timeout=120 + 10 * len(paths), what="parity run")  # fmt: skip
    finally:
        _cleanup(host, run)
    lines = [json.loads(line) for line in done.stdout.decode(errors="replace").splitlines() if line.startswith("{")]
    return collect(lines, len(paths), {"kind": "board", "host": host}, time.perf_counter() - started)


def bench_on_board(host: str, bundle: Path, args: list[str]) -> dict[str, Any]:
    """The runtime's ``bench`` on the board (``args`` as for ``edgetl bench``): its JSON, with the host."""
    run, python = _session(host, bundle, _payload(bundle, [], None))
    try:
        done = remote(host, f"cd {run} && PYTHONPATH=bundle {python} -m edgetl_runtime bench bundle --json "
                            + " ".join(shlex.quote(a) for a in args), what="benchmark")  # fmt: skip
    finally:
        _cleanup(host, run)
    try:
        result = json.loads(done.stdout.decode(errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DeviceRunError(f"the benchmark on {host} printed no result") from None
    return {**result, "host": host}


def _cleanup(host: str, run: str) -> None:
    try:
        subprocess.run([*ssh_base(host), f"rm -rf {run}"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        pass
