"""A real board over ssh, played by this machine: an sshd the test starts on 127.0.0.1 with a throwaway
key (loopback only). ``edgetl check RUN --on-target --ssh HOST`` and ``edgetl bench BUNDLE --ssh HOST``
copy the bundle, make a virtualenv "on the board" from its requirements-device.txt, run the runtime
there and bring the JSON back. Skipped with the reason where sshd is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
from click.testing import CliRunner
from conftest import copy_run
from test_ontarget import pi_target

from edgetl.cli import main
from edgetl.rundir import read_manifest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("sshd") and not os.path.exists("/usr/sbin/sshd"),
                       reason="needs OpenSSH's sshd (apt-get install openssh-server)"),  # fmt: skip
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """An sshd on 127.0.0.1 and an ssh config naming it: hosts ``board``, ``board-nopython`` and
    ``board-wrongkey``, plus ``board-down`` (a port nothing listens on)."""
    base = tmp_path_factory.mktemp("board")
    for name in ("host_key", "user_key", "other_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True)
    (base / "authorized_keys").write_text((base / "user_key.pub").read_text())
    port, bare_port, home = free_port(), free_port(), base / "board-home"
    home.mkdir()
    (base / "sshd_config").write_text(f"""ListenAddress 127.0.0.1
Port {port}
Port {bare_port}
HostKey {base / 'host_key'}
AuthorizedKeysFile {base / 'authorized_keys'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
SetEnv EDGETL_BOARD_HOME={home}
PidFile {base / 'sshd.pid'}
Match LocalPort {bare_port}
  ForceCommand /usr/bin/env PATH=/nonexistent /bin/sh -c "$SSH_ORIGINAL_COMMAND"
""")
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", str(base / "sshd_config")],
                            stderr=open(base / "sshd.log", "wb"))  # fmt: skip
    common = ("HostName 127.0.0.1\n  User {user}\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
              "  LogLevel ERROR\n  IdentitiesOnly yes\n").format(user=os.environ.get("USER", "root"))  # fmt: skip
    (base / "ssh_config").write_text(
        f"Host board\n  {common}  Port {port}\n  IdentityFile {base / 'user_key'}\n"
        f"Host board-nopython\n  {common}  Port {bare_port}\n  IdentityFile {base / 'user_key'}\n"
        f"Host board-wrongkey\n  {common}  Port {port}\n  IdentityFile {base / 'other_key'}\n"
        f"Host board-down\n  {common}  Port {free_port()}\n  IdentityFile {base / 'user_key'}\n"
    )  # fmt: skip
    for _ in range(50):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    previous = os.environ.get("EDGETL_SSH_CONFIG")
    os.environ["EDGETL_SSH_CONFIG"] = str(base / "ssh_config")
    yield home
    sshd.terminate()
    sshd.wait(timeout=10)
    if previous is None:
        os.environ.pop("EDGETL_SSH_CONFIG", None)
    else:
        os.environ["EDGETL_SSH_CONFIG"] = previous


def cli(*args):
    return CliRunner().invoke(main, ["-q", *args])


@pytest.fixture(scope="module")
def board_run(exported_run, board, tmp_path_factory):
    """A packaged copy of the exported run (the bundle under RUN/bundles/)."""
    base = tmp_path_factory.mktemp("board-run")
    run_dir = copy_run(exported_run[1], base / "run")
    target = pi_target(base)
    packaged = cli("package", str(run_dir), "--target", target, "--no-on-target")
    assert packaged.exit_code == 0, packaged.output
    return run_dir, target


def test_check_on_target_over_ssh_records_the_board(board_run, board):
    run_dir, target = board_run
    result = cli("check", str(run_dir), "--on-target", target, "--ssh", "board", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["where"]["kind"] == "board" and record["where"]["host"] == "board"
    assert record["where"]["board"] and record["where"]["machine"] and "ai-edge-litert" in record["where"]["versions"]
    count = read_manifest(run_dir)["stages"]["check"]["data"]["count"]
    assert record["count"] == count and record["passed"]
    # the "board" is this host: its LiteRT runs the same x86 kernels as the host check
    assert record["kernel_agreement_with_host"] == 1.0
    assert any(key.endswith("@ ssh:board") for key in read_manifest(run_dir)["stages"]["on_target"]["verdicts"])
    assert not list((board / "").glob("run-*")), "the run folder on the board is removed"
    assert list(board.glob("venv-*/.edgetl-ready")), "the board's virtualenv is kept for the next run"


def test_bench_over_ssh_lands_in_benchmark_and_report(board_run, board):
    run_dir, _ = board_run
    bundle = next((run_dir / "bundles").glob("*/"))
    assert cli("benchmark", str(run_dir), "--threads", "1", "--runs", "3").exit_code == 0
    result = cli("bench", str(bundle), "--ssh", "board", "--threads", "1", "--runs", "3", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["host"] == "board" and payload["results"][0]["threads"] == 1 and payload["device"]["board"]
    markdown = (run_dir / "benchmark.md").read_text()
    assert "latency on a board" in markdown and payload["device"]["board"] in markdown
    assert json.loads((run_dir / "benchmark.json").read_text())["devices"]["boards"]
    assert "board" in (run_dir / "report.html").read_text()


@pytest.mark.parametrize(("host", "message"), [
    ("board-down", "cannot reach board-down over ssh"),
    ("board-wrongkey", "cannot reach board-wrongkey over ssh: "),
    ("board-nopython", "board-nopython has no python3"),
])  # fmt: skip
def test_board_faults_are_one_line(board_run, host, message):
    run_dir, target = board_run
    bundle = next((run_dir / "bundles").glob("*/"))
    for args in (("check", str(run_dir), "--on-target", target, "--ssh", host), ("bench", str(bundle), "--ssh", host)):
        outcome = cli(*args)
        assert outcome.exit_code == 1, outcome.output
        assert message in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1


def test_search_measures_latency_on_the_board(board, toy_data, tmp_path):
    """`edgetl search --latency-on ssh:HOST`: each complete trial's model is packaged and timed on the board."""
    pytest.importorskip("optuna", reason="needs the train extra (optuna)")
    target = pi_target(tmp_path)
    out = tmp_path / "search"
    data = shutil.copytree(toy_data, tmp_path / "data")  # its own image-cache entries (64 px), not the toy run's
    done = cli("search", str(data), "--out", str(out), "--target", target, "--sizes", "64", "--widths", "0.35",
               "--weights", "none", "--head-epochs", "1", "--finetune-epochs", "1", "--batch-size", "16",
               "--trials", "1", "--latency-on", "ssh:board", "--json")  # fmt: skip
    assert done.exit_code in (0, 4), done.output
    row = json.loads((out / "search.json").read_text())["trials"][0]
    assert row["status"] in ("complete", "over-budget") and row["latency"]["how"] == "measured on board", row
    assert row["latency"]["board"] and row["latency"]["ms"] > 0
    assert row["latency"]["host_ms"] > 0  # this host's figure is kept beside it
