"""The commands that judge and ship a run: ``check`` (on this host, or where the target runs it),
``package``, ``verify``, and the device runtime on this host or a board (``run``, ``bench``)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from edgetl.cli.commands import finish, load_target, main, report_after
from edgetl.cli.edge import FRACTION, NON_NEGATIVE, cache_dir_option, one_line
from edgetl.errors import ConfigError, ExitCode, require

RUN_TARGET = "-"  # --on-target without a value: the target the run was packaged for


def render() -> Any:
    from edgetl import render as module

    return module


class OnTargetVerdict:
    """An on-target verdict as a command result (exit 3 when it fails the target's thresholds)."""

    def __init__(self, record: dict[str, Any]):
        self.record = record

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.record["passed"] else ExitCode.PARITY_FAILED

    def to_dict(self) -> dict[str, Any]:
        return self.record


def bundled_target(run_dir: str) -> Any:
    """The target of the run's one bundle (``--on-target`` without a name)."""
    from edgetl.rundir import run_bundles

    names = sorted({manifest["target"]["name"] for _, manifest in run_bundles(run_dir)})
    if len(names) != 1:
        found = f"bundles for {', '.join(names)}" if names else "no bundle"
        raise ConfigError(f"--on-target needs a target name: {run_dir} has {found}",
                          hint="e.g. edgetl check RUN --on-target rpi4-cpu")  # fmt: skip
    return load_target(names[0])


@main.command("check")
@cache_dir_option
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="Evaluate on this folder (DATA/<class>/...) instead of the run's val split.")
@click.option("--max-drop", type=NON_NEGATIVE, default=None, help="Allowed top-1 drop in points [1.0].")
@click.option("--min-agreement", type=FRACTION, default=None, help="Required top-1 agreement [0.98].")
@click.option("--on-target", "on_target", is_flag=False, flag_value=RUN_TARGET, default=None, metavar="[TARGET]",
              help="Check the bundle where TARGET runs it instead: its own runtime on the target's CPU, emulated "
                   "(qemu-user), or on the board of --ssh [TARGET: the run's bundle's target].")
@click.option("--ssh", default=None, metavar="HOST",
              help="With --on-target: run on this board over ssh (any host ssh accepts, e.g. a ~/.ssh/config alias).")
@click.option("--mediapipe", default=None, metavar="PYTHON",
              help="With --on-target: run the bundle's model in MediaPipe Tasks' ImageClassifier instead, with "
                   "this interpreter (one that has mediapipe), given the region of interest edgetl crops.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def check_command(run_dir: str, data: str | None, max_drop: float | None, min_agreement: float | None,
                  on_target: str | None, ssh: str | None, mediapipe: str | None, as_json: bool) -> None:  # fmt: skip
    """Check every exported model in RUN_DIR against the float model (exit 3 on failure).

    With --on-target, check the target's bundle where it runs (a separate verdict; the host's stays).
    """
    require("torch", "train")
    if (ssh is not None or mediapipe is not None) and on_target is None:
        raise click.UsageError("--ssh and --mediapipe go with --on-target")
    if ssh is not None and mediapipe is not None:
        raise click.UsageError("--ssh and --mediapipe are two places to run it: give one")
    if on_target is not None:
        if max_drop is not None or min_agreement is not None:
            raise click.UsageError("--on-target judges by the target's own thresholds: drop --max-drop/--min-agreement")
        from edgetl.pipeline import check_on_target

        target = load_target(on_target) if on_target != RUN_TARGET else bundled_target(run_dir)
        record = check_on_target(run_dir, target, ssh=ssh, data=data, mediapipe=mediapipe)
        report_after(run_dir)
        finish(as_json, OnTargetVerdict(record), render().on_target_text(record, run_dir))
        return
    from edgetl.check.parity import check
    from edgetl.config import Thresholds

    report = check(run_dir, Thresholds.build(max_drop, min_agreement), data)
    report_after(run_dir)
    finish(as_json, report, render().check_text(report, run_dir))


@main.command("package")
@cache_dir_option
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--target", required=True, help="Target name or .toml path.")
@click.option("--out", type=click.Path(path_type=str), default=None, help="Output folder [RUN_DIR/bundles].")
@click.option("--force", is_flag=True, help="Package even if parity failed (recorded in the manifest).")
@click.option("--accept-weak-parity", is_flag=True,
              help="Ship on a parity verdict from fewer images than the target's min_images, or weaker than the "
                   "export's own check (recorded in the manifest; the runtime warns).")
@click.option("--no-compile", is_flag=True,
              help="Accelerator targets: ship the compile-ready model and a script instead of compiling.")
@click.option("--allow-cpu-ops", is_flag=True, help="Accept ops that the accelerator compiler leaves on the CPU.")
@click.option("--tflm/--no-tflm", "check_tflm", default=True,
              help="MCU targets: run the model with TFLite Micro on validation images (op support, minimum "
                   "arena, outputs vs LiteRT) [on].")
@click.option("--on-target/--no-on-target", "on_target", default=True, envvar="EDGETL_ON_TARGET",
              help="Targets with an emulated CPU (Raspberry Pi): check the bundle on that CPU with its own "
                   "runtime and wheels before writing it; needs qemu-user-static and debootstrap "
                   "[on; EDGETL_ON_TARGET=0 turns it off].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def package_command(run_dir: str, target: str, out: str | None, force: bool, accept_weak_parity: bool,
                    no_compile: bool, allow_cpu_ops: bool, check_tflm: bool, on_target: bool,
                    as_json: bool) -> None:  # fmt: skip
    """Bundle RUN_DIR's model for a target: folder + reproducible .tar.gz.

    Exit 3 if the shipped artifact failed parity (on this host, or on the target's emulated CPU), 4 if it
    breaks a target constraint, 5 if the
    target's compiler is missing, 7 if the accelerator compiler leaves operations on the CPU.
    Budgets (exit 4) include the compiled model's size and, for microcontrollers and NPUs, the
    tensor arena measured with TFLite Micro or Vela's SRAM use.
    """
    from edgetl.pipeline import package_verified

    chosen = load_target(target)
    if on_target and chosen.device.emulate:
        require("torch", "train")  # the on-target verdict compares with the float model
    result = package_verified(run_dir, chosen, out, force, on_target=on_target, compile_model=not no_compile,
                              allow_cpu_ops=allow_cpu_ops, check_tflm=check_tflm,
                              accept_weak_parity=accept_weak_parity)  # fmt: skip
    report_after(run_dir, (str(result.bundle_dir),))
    finish(as_json, result, render().package_text(result))


@main.command("verify")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def verify_command(bundle: str, as_json: bool) -> None:
    """Re-hash every file of a bundle (folder or .tar.gz) against its manifest (exit 6 on a mismatch)."""
    from edgetl.package.verify import verify_report

    report = verify_report(bundle)
    if report.problems:  # the details go to stdout; the error line, like every error, to stderr
        more = f" (+{len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        click.echo(one_line(f"edgetl: error: {bundle} failed verification: {report.problems[0]}{more}"), err=True)
    finish(as_json, report, render().verify_text(bundle, report.problems))


@main.command("run", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_command(bundle: str, args: tuple[str, ...]) -> None:
    """Run a bundle on images with the device runtime (same as `python -m edgetl_runtime`)."""
    from edgetl.runtime.app import main as runtime_main

    sys.exit(runtime_main([bundle, *args], prog="edgetl"))


@main.command("bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("bundle", type=click.Path(path_type=str))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(bundle: str, args: tuple[str, ...]) -> None:
    """Latency of a bundle or model: invoke and whole frame, per thread count (--threads 1,2,4 --runs N).

    More bundles or models after the first are timed with it, interleaved (round after round, each
    once), so their figures compare even on a busy host; a busy host is said, not hidden.

    With --ssh HOST, on that board: the bundle is copied, its requirements installed in a virtualenv
    there (kept for the next time), and the result recorded in the run the bundle came from
    (benchmark.md/.json, report.html).
    """
    rest, host = split_ssh(list(args))
    if host is None:
        from edgetl.runtime.app import main as runtime_main

        sys.exit(runtime_main(["bench", bundle, *rest], prog="edgetl"))
    from pathlib import Path

    from edgetl.ontarget.board import bench_on_board
    from edgetl.ontarget.verdict import record_board_bench

    if not (Path(bundle) / "manifest.json").is_file():
        raise ConfigError(f"{bundle} is not a bundle folder: --ssh runs a bundle (edgetl package makes one)")
    result = bench_on_board(host, Path(bundle), rest)
    run_dir = record_board_bench(Path(bundle), result)
    if run_dir is not None:
        report_after(str(run_dir))
    if "--json" in rest:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        click.echo(render().board_bench_text(result, run_dir))


def split_ssh(args: list[str]) -> tuple[list[str], str | None]:
    """``--ssh HOST`` (or ``--ssh=HOST``) taken out of the runtime's arguments."""
    for i, arg in enumerate(args):
        if arg.startswith("--ssh="):
            return args[:i] + args[i + 1 :], arg.split("=", 1)[1]
        if arg == "--ssh":
            if i + 1 >= len(args):
                raise click.UsageError("--ssh needs a HOST")
            return args[:i] + args[i + 2 :], args[i + 1]
    return args, None
