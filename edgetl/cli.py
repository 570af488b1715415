"""The ``edgetl`` command line: a thin layer over the library.

Only light modules are imported here; each command imports its stage (torch, tensorflow, ...) when it
runs, so ``edgetl --help`` starts fast and works without the heavy extras. Errors from the library
(:class:`edgetl.errors.EdgetlError`) are caught once, in :class:`EdgetlGroup`, and become one line on
stderr and a documented exit code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

import click

from edgetl import __version__
from edgetl.errors import EdgetlError, ExitCode, require

log = logging.getLogger("edgetl")

WEIGHTS_ENV = "EDGETL_WEIGHTS"


def _one_line(text: str) -> str:
    """Control characters (a newline in a folder name, say) shown escaped: an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class EdgetlGroup(click.Group):
    """Click group that turns every failure into one ``edgetl: error:`` line and an exit code.

    Library errors (:class:`EdgetlError`) carry their own code; usage errors exit 2; an OS error (a
    read-only folder, a full disk) exits 1 with the path; anything unexpected exits 1 and asks for
    ``--traceback``. With ``--json`` the command also prints ``{"error": {...}}`` on stdout, so a
    script that parses stdout always gets one object.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        self._wants_json = "--json" in argv
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:  # bad options, missing arguments, unknown commands
            hint = "see --help" if isinstance(exc, click.UsageError) else None
            code = self._fail(exc.format_message(), hint, exc.exit_code)
        except click.Abort:  # Ctrl-C while click itself was reading input
            code = self._fail("interrupted", None, int(ExitCode.INTERRUPTED))
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except EdgetlError as exc:
            self._reraise_if_asked(ctx)
            ctx.exit(self._fail(exc.message, exc.hint, int(exc.exit_code)))
        except KeyboardInterrupt:
            ctx.exit(self._fail("interrupted", None, int(ExitCode.INTERRUPTED)))
        except OSError as exc:  # a read-only or full disk, a folder that vanished: say which path
            from edgetl.errors import os_error_message

            self._reraise_if_asked(ctx)
            ctx.exit(self._fail(os_error_message(exc), None, int(ExitCode.ERROR)))
        except Exception as exc:  # a bug: still one line, and how to see more
            from edgetl.errors import first_line

            self._reraise_if_asked(ctx)
            message = f"internal error: {type(exc).__name__}: {first_line(exc)}"
            ctx.exit(self._fail(message, "re-run with --traceback and report it", int(ExitCode.ERROR)))

    @staticmethod
    def _reraise_if_asked(ctx: click.Context) -> None:
        if (ctx.obj or {}).get("traceback"):
            raise

    def _fail(self, message: str, hint: str | None, code: int) -> int:
        message = _one_line(message)
        hint_text = f" (hint: {_one_line(hint)})" if hint else ""
        if getattr(self, "_wants_json", False):
            error = {"message": message, "hint": hint, "exit_code": code}
            click.echo(json.dumps({"ok": False, "error": error}, sort_keys=True))
        click.echo(f"edgetl: error: {message}{hint_text}", err=True)
        return code


class Finite(click.FloatRange):
    """A float option that must be a finite number (``inf`` and ``nan`` are usage errors), in range."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


POSITIVE = Finite(min=0, min_open=True)
NON_NEGATIVE = Finite(min=0)
FRACTION = Finite(min=0, max=1)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edgetl: %(levelname)s: %(message)s"))
    root = logging.getLogger("edgetl")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if not verbose:
        # Conversion and framework chatter stays out of the terminal unless -v.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        for name in ("tensorflow", "absl", "onnx2tf", "h5py"):
            logging.getLogger(name).setLevel(logging.ERROR)


@click.group(cls=EdgetlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetl")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug, tool chatter).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("--traceback", is_flag=True, help="Show the Python traceback of an error.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, traceback: bool) -> None:
    """edgetl: fine-tune MobileNetV2 on your images, export, verify and ship it to edge devices.

    \b
    Exit codes: 0 ok, 1 error, 2 usage, 3 parity failed, 4 constraint violated,
    5 missing dependency, 6 bundle verification failed, 7 accelerator left ops on the CPU,
    130 interrupted.
    """
    ctx.obj = {"traceback": traceback}
    _setup_logging(verbose, quiet)


def _emit(as_json: bool, payload: dict[str, Any], text: str) -> None:
    if as_json:
        click.echo(json.dumps(payload, sort_keys=True, default=str))
    else:
        click.echo(text)


def _finetune_summary(result: Any) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"run:        {result.run_dir}",
        f"classes:    {len(result.classes)} ({', '.join(result.classes[:8])}"
        f"{', ...' if len(result.classes) > 8 else ''})",
        f"val top-1:  {pct(result.best_val_acc)} (best epoch {result.best_epoch} of "
        f"{result.epochs_run}{', stopped early' if result.stopped_early else ''})",
        f"by phase:   head-only {pct(result.phase1_val_acc)}, fine-tuned {pct(result.phase2_val_acc)}",
    ]
    if result.test_acc is not None:
        lines.append(f"test top-1: {pct(result.test_acc)} (held-out test split)")
    if result.skipped_files:
        lines.append(f"skipped:    {result.skipped_files} unreadable file(s), listed in metrics.json")
    lines.append(f"time:       {result.seconds:.0f}s on {result.device}")
    return "\n".join(lines)


@main.command()
@click.argument("data", type=click.Path(path_type=str))
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=str),
              help="Run directory to write (checkpoint, metrics, charts, manifest).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last epoch.")
@click.option("--weights", default=None,
              help=f"imagenet | none | PATH to a state_dict. Default: ${WEIGHTS_ENV}, else imagenet.")
@click.option("--width", type=POSITIVE, default=None, help="MobileNetV2 width multiplier [1.0].")
@click.option("--image-size", type=int, default=None, help="Square input side in pixels [224].")
@click.option("--head-epochs", type=int, default=None, help="Phase 1 epochs, backbone frozen [5].")
@click.option("--finetune-epochs", type=int, default=None, help="Phase 2 epochs, unfrozen [10].")
@click.option("--unfreeze-from", type=int, default=None,
              help="First `features` block trained in phase 2 [last third]; 0 = all.")
@click.option("--lr", type=POSITIVE, default=None, help="Head learning rate in phase 1 [1e-3].")
@click.option("--finetune-lr", type=POSITIVE, default=None, help="Head LR in phase 2 [lr/10].")
@click.option("--backbone-lr-mult", type=POSITIVE, default=None, help="Backbone LR = head LR x this [0.1].")
@click.option("--bn", type=click.Choice(["frozen", "train"]), default=None,
              help="BatchNorm statistics in phase 2 [frozen].")
@click.option("--patience", type=int, default=None, help="Early-stopping patience, phase 2 [3].")
@click.option("--batch-size", type=int, default=None, help="Batch size [32].")
@click.option("--label-smoothing", type=Finite(), default=None, help="Label smoothing [0.1].")
@click.option("--flip/--no-flip", default=None, help="Random horizontal flips [on].")
@click.option("--val-fraction", type=Finite(), default=None, help="Held out when there is no val/ [0.2].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[auto]")
@click.option("--seed", type=int, default=None, help="Random seed [0].")
@click.option("--compile/--no-compile", default=None, help="torch.compile the model (CUDA only) [off].")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes (DDP via torchrun): one per GPU, or CPU processes.")
@click.option("--target", default=None, help="Take input size (and width) from this target.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def finetune(data: str, run_dir: str, resume: bool, target: str | None, as_json: bool, nproc: int,
             **options: Any) -> None:  # fmt: skip
    """Fine-tune MobileNetV2 on an image folder (freeze, then unfreeze).

    DATA is DATA/<class>/images or DATA/train/<class>/ + DATA/val/<class>/; DATA/test/ is only
    used for a final, separate evaluation. With --nproc N, N processes train data-parallel
    (equivalently: torchrun --nproc-per-node N -m edgetl finetune ...).
    """
    require("torch", "train")
    require("torchvision", "train")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from edgetl.distributed import launch

        sys.exit(launch(nproc, _without_option(sys.argv[1:], "--nproc")))
    from edgetl.config import FinetuneConfig
    from edgetl.train import finetune as run_finetune

    if options["weights"] is None and not resume:
        options["weights"] = os.environ.get(WEIGHTS_ENV) or None
    from_target: dict[str, Any] = {}
    if target is not None:
        from edgetl.targets import load_target

        spec = load_target(target)
        from_target = {"image_size": spec.input.size, "width": spec.model.width}
    # Precedence, highest on the right: defaults < target file < flags.
    cfg = FinetuneConfig.build(from_target, options) if not resume else None
    result = run_finetune(data, run_dir, cfg or FinetuneConfig(), resume=resume, overrides=options)
    if result is None:  # a rank other than 0 of a distributed run: rank 0 reports
        return
    _emit(as_json, result.to_dict(), _finetune_summary(result))


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` minus ``NAME VALUE`` / ``NAME=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out


@main.command()
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="Use this image folder instead of the generated dataset.")
@click.option("--out", "out_dir", type=click.Path(path_type=str), default="runs/demo",
              show_default=True, help="Where the dataset and the run go.")
@click.option("--export/--no-export", "with_export", default=True, help="Also export and check parity.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def demo(data: str | None, out_dir: str, with_export: bool, as_json: bool) -> None:
    """Run the pipeline end to end on a generated dataset (CPU-friendly, a few minutes)."""
    require("torch", "train")
    from edgetl.demo import run_demo
    from edgetl.errors import ExitCode

    result = run_demo(out_dir, data=data, weights=os.environ.get(WEIGHTS_ENV), with_export=with_export)
    _emit(as_json, result.to_dict(), result.summary())
    if result.export and not result.export["parity_passed"]:
        sys.exit(int(ExitCode.PARITY_FAILED))


def _parity_lines(report: Any) -> list[str]:
    lines = []
    for name, m in report.artifacts.items():
        verdict = "pass" if m["passed"] else "FAIL"
        ties = m.get("near_ties") or {}
        differ = ties.get("disagreements_within", 0) + ties.get("disagreements_outside", 0)
        flips = f" ({differ} differ, {ties['disagreements_within']} of them near-ties)" if differ else ""
        lines.append(
            f"  {name:<22} top-1 {100 * m['top1']:6.2f}%  Δ {m['delta_top1_pp']:+.2f} pp  "
            f"agreement {100 * m['agreement']:6.2f}%{flips}  {verdict}"
        )
    return lines


@main.command()
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--int8/--no-int8", default=None, help="Also make the full-integer model [on, or as the target needs].")
@click.option("--target", default=None, help="Take quantisation and parity thresholds from this target.")
@click.option("--calib", default=None, help="Calibration recipe: a name in calib/ or a .toml path [default].")
@click.option("--calib-dir", type=click.Path(path_type=str), default=None,
              help="Calibrate on your own folder of representative images instead.")
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="Check parity on this folder (DATA/<class>/...) instead of the run's val split.")
@click.option("--max-drop", type=NON_NEGATIVE, default=None, help="Allowed top-1 drop in points [1.0].")
@click.option("--min-agreement", type=FRACTION, default=None, help="Required top-1 agreement [0.98].")
@click.option("--no-remedies", is_flag=True, help="Do not diagnose or try remedies when int8 fails.")
@click.option("--bias-correction/--no-bias-correction", default=None,
              help="Correct each int8 layer's weight-rounding shift [the recipe's setting: on].")
@click.option("--equalize/--no-equalize", default=True,
              help="Equalise channel ranges in the int8 model's weights before conversion [on].")
@click.option("--converter", type=click.Choice(["direct", "onnx2tf"]), default="direct", show_default=True,
              help="TFLite route: rebuild the model in TensorFlow from its weights, or convert the ONNX with onnx2tf.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def export(run_dir: str, int8: bool | None, target: str | None, calib: str | None, calib_dir: str | None,
           data: str | None, max_drop: float | None, min_agreement: float | None, no_remedies: bool,
           bias_correction: bool | None, equalize: bool, converter: str, as_json: bool) -> None:
    """Export RUN_DIR to ONNX and TFLite (float32, int8), verify, and check parity.

    Exits 3 when an artifact fails parity; failing artifacts are marked so that packaging refuses them.
    """
    require("torch", "train")
    # Both import TensorFlow, which the export runs in a child process.
    require("onnx2tf" if converter == "onnx2tf" else "tensorflow", "export", import_it=False)
    from edgetl.errors import ExitCode
    from edgetl.export import ExportConfig
    from edgetl.export import export as run_export

    if target is not None:
        from edgetl.targets import load_target

        spec = load_target(target)
        int8 = spec.precision in ("int8", "int16x8") if int8 is None else int8
        max_drop = spec.parity.max_drop if max_drop is None else max_drop
        min_agreement = spec.parity.min_agreement if min_agreement is None else min_agreement
    cfg = ExportConfig(int8=True if int8 is None else int8, calib=calib or "default", calib_dir=calib_dir,
                       remedies=not no_remedies, thresholds=_thresholds(max_drop, min_agreement),
                       bias_correction=bias_correction, equalize=equalize, converter=converter)  # fmt: skip
    result = run_export(run_dir, cfg, data)
    sizes = [f"  {name:<22} {a['bytes'] / 1e6:6.2f} MB  {a['precision']}" for name, a in result.artifacts.items()]
    text = [f"exported {run_dir}:", *sizes, "parity (vs float PyTorch):", *_parity_lines(result.parity)]
    text += [f"remedy: {r['remedy']}: {'pass' if r.get('passed') else 'fail'}" for r in result.remedies
             if "passed" in r]  # fmt: skip
    text.append(f"time: {result.timings['total_s']:.0f}s; report: {run_dir}/parity.md")
    int8 = result.parity.artifacts.get("model_int8.tflite")
    if int8 is not None and not int8["passed"]:
        from edgetl.parity import next_steps

        text += [f"next: {step}".replace("`", "") for step in next_steps(run_dir, int8)]
    _emit(as_json, result.to_dict(), "\n".join(text))
    if not result.parity.passed:
        sys.exit(int(ExitCode.PARITY_FAILED))


def _thresholds(max_drop: float | None, min_agreement: float | None) -> Any:
    from edgetl.errors import ConfigError
    from edgetl.parity import Thresholds

    defaults = Thresholds()
    thresholds = Thresholds(
        max_drop=defaults.max_drop if max_drop is None else max_drop,
        min_agreement=defaults.min_agreement if min_agreement is None else min_agreement,
    )
    if thresholds.max_drop < 0 or not 0 <= thresholds.min_agreement <= 1:
        raise ConfigError("--max-drop must be >= 0 and --min-agreement within 0..1")
    return thresholds


@main.command("qat")
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), help="The new run directory.")
@click.option("--epochs", type=int, default=3, show_default=True, help="Epochs with simulated int8.")
@click.option("--lr", type=POSITIVE, default=1e-5, show_default=True, help="AdamW learning rate (cosine to 0).")
@click.option("--calib", default="default", show_default=True,
              help="Calibration recipe for the simulated activation ranges (use the export's).")
@click.option("--consistency", type=NON_NEGATIVE, default=0.0, show_default=True,
              help="Weight of the int8-vs-float agreement (KL) term in the loss; 0 = labels only.")
@click.option("--distill", type=NON_NEGATIVE, default=4.0, show_default=True,
              help="Weight of the distillation term (KL from the original model's predictions, T=2).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def qat_command(run_dir: str, out_dir: str, epochs: int, lr: float, calib: str, consistency: float,
                distill: float, as_json: bool) -> None:
    """Quantisation-aware fine-tuning: RUN_DIR's model, trained a few epochs with simulated int8, as a new run.

    For an int8 model that fails parity. The new run keeps RUN_DIR's float model (the parity reference)
    and adds the quantisation-aware weights the int8 model is built from; export it as usual. RUN_DIR is
    not changed.
    """
    require("torch", "train")
    from edgetl.qat import QATConfig, quantization_aware_finetune

    settings = QATConfig(epochs=epochs, lr=lr, calib=calib, consistency=consistency, distill=distill)
    record = quantization_aware_finetune(run_dir, out_dir, settings)

    def line(row: dict) -> str:
        sim = row["simulated_int8"]
        return (f"float top-1 {100 * row['float']['top1']:.2f}%, simulated int8 top-1 {100 * sim['top1']:.2f}% "
                f"(agreement with the original float model {100 * sim['agreement']:.2f}%)")  # fmt: skip

    text = [f"before: {line(record['before'])}", f"after:  {line(record['after'])}",
            f"new run: {out_dir} ({record['seconds']:.0f}s); next: edgetl export {out_dir}"]  # fmt: skip
    _emit(as_json, {"run_dir": out_dir, **record}, "\n".join(text))


@main.command("check")
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="Evaluate on this folder (DATA/<class>/...) instead of the run's val split.")
@click.option("--max-drop", type=NON_NEGATIVE, default=None, help="Allowed top-1 drop in points [1.0].")
@click.option("--min-agreement", type=FRACTION, default=None, help="Required top-1 agreement [0.98].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def check_command(run_dir: str, data: str | None, max_drop: float | None, min_agreement: float | None,
                  as_json: bool) -> None:
    """Check every exported model in RUN_DIR against the float model (exit 3 on failure)."""
    require("torch", "train")
    from edgetl.errors import ExitCode
    from edgetl.parity import check

    report = check(run_dir, _thresholds(max_drop, min_agreement), data)
    float_top1 = 100 * report.float_metrics["top1"]
    text = [f"parity on {report.data['count']} images ({report.data['source']}, sha256 {report.data['sha256'][:12]}); "
            f"float top-1 {float_top1:.2f}%",
            *_parity_lines(report), f"report: {run_dir}/parity.md"]  # fmt: skip
    _emit(as_json, report.to_dict(), "\n".join(text))
    if not report.passed:
        sys.exit(int(ExitCode.PARITY_FAILED))


@main.group("targets", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.pass_context
def targets_group(ctx: click.Context, as_json: bool) -> None:
    """List the edge targets (targets/*.toml); `targets show NAME` prints one."""
    if ctx.invoked_subcommand is not None:
        return
    from edgetl.targets import all_targets

    found = all_targets()
    rows = [f"{t.name:<15} {t.runtime:<12} {t.precision:<8} {t.description}" for t in found]
    payload = {"targets": [{"name": t.name, "runtime": t.runtime, "precision": t.precision,
                            "description": t.description, "file": t.source} for t in found]}  # fmt: skip
    _emit(as_json, payload, "\n".join([f"{'NAME':<15} {'RUNTIME':<12} {'PRECISION':<8} DESCRIPTION", *rows]))


@targets_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def targets_show(name: str, as_json: bool) -> None:
    """Print one target, resolved (NAME or a path to a .toml file)."""
    from edgetl.targets import load_target

    target = load_target(name)
    text = [f"{target.name}: {target.description}", f"file: {target.source}"]
    for key, value in target.to_dict().items():
        if isinstance(value, dict):
            text.append(f"[{key}]")
            text += [f"  {k} = {v!r}" for k, v in value.items()]
        elif key not in ("name", "description"):
            text.append(f"{key} = {value!r}")
    _emit(as_json, {**target.to_dict(), "file": target.source}, "\n".join(text))


@targets_group.command("stamp")
@click.argument("name")
@click.argument("stage", type=click.Choice(["finetune", "export", "package"]))
def targets_stamp(name: str, stage: str) -> None:
    """Print the part of a target that STAGE depends on (for make's content stamps)."""
    from edgetl.targets import load_target

    target = load_target(name).to_dict()
    parts = {
        "finetune": ("input", "model"),
        "export": ("input", "model", "artifact", "quantization", "parity"),
        "package": tuple(target),
    }[stage]
    click.echo(json.dumps({k: target[k] for k in parts}, sort_keys=True))


@main.command("package")
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def package_command(run_dir: str, target: str, out: str | None, force: bool, accept_weak_parity: bool,
                    no_compile: bool, allow_cpu_ops: bool, check_tflm: bool, as_json: bool) -> None:  # fmt: skip
    """Bundle RUN_DIR's model for a target: folder + reproducible .tar.gz.

    Exit 3 if the shipped artifact failed parity, 4 if it breaks a target constraint, 5 if the
    target's compiler is missing, 7 if the accelerator compiler leaves operations on the CPU.
    Budgets (exit 4) include the compiled model's size and, for microcontrollers and NPUs, the
    tensor arena measured with TFLite Micro or Vela's SRAM use.
    """
    from edgetl.package import package
    from edgetl.targets import load_target

    result = package(run_dir, load_target(target), out, force, compile_model=not no_compile,
                     allow_cpu_ops=allow_cpu_ops, check_tflm=check_tflm,
                     accept_weak_parity=accept_weak_parity)  # fmt: skip
    lines = [f"bundle:  {result.bundle_dir}", f"archive: {result.archive} (sha256 {result.archive_sha256})"]
    lines += [f"  {rel:<32} {entry['size']:>10,} B" for rel, entry in result.files.items()]
    lines += _compile_summary(result.accelerator, result.tflm)
    if result.forced:
        lines.append("WARNING: packaged with --force although parity failed")
    if result.parity.get("evidence_waived"):
        lines.append(f"WARNING: packaged on weak parity evidence: {result.parity['evidence_waived']}")
    _emit(as_json, result.to_dict(), "\n".join(lines))


def _compile_summary(accelerator: dict | None, tflm: dict | None) -> list[str]:
    lines = []
    if accelerator and accelerator.get("compiled") and accelerator["tool"] == "vela":
        a = accelerator
        lines.append(f"vela {a['vela_version']} ({a['accelerator']}, {a['system_config']}, {a['memory_mode']}): "
                     f"{a['npu_ops']}/{a['npu_ops'] + a['cpu_ops']} ops on the NPU, SRAM {a['sram_bytes']:,} B, "
                     f"flash {a['flash_bytes']:,} B, estimated {1000 * a['inference_time_s']:.2f} ms/inference")
    elif accelerator and accelerator.get("compiled"):
        a = accelerator
        lines.append(f"edgetpu_compiler: {a['tpu_ops']}/{a['total_ops']} ops on the Edge TPU, "
                     f"on-chip {a.get('on_chip_bytes') or 0:,} B, off-chip {a.get('off_chip_bytes') or 0:,} B")
    if tflm:
        ref, default = tflm["compared"]["litert_reference_kernels"], tflm["compared"]["litert_default_kernels"]
        lines.append(f"tflite-micro {tflm['version']}: minimum arena {tflm['arena_bytes']:,} B"
                     f"{'' if tflm['arena_verified'] else ' (NOT verified)'}; on {tflm['images']} images top-1 "
                     f"{100 * tflm['top1']:.2f}%, max output difference vs LiteRT reference kernels "
                     f"{ref['max_abs_diff_steps']} steps, top-1 agreement with LiteRT (XNNPACK) "
                     f"{100 * default['agreement']:.2f}%")
    return lines


@main.command("verify")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def verify_command(bundle: str, as_json: bool) -> None:
    """Re-hash every file of a bundle (folder or .tar.gz) against its manifest (exit 6 on a mismatch)."""
    from edgetl.verify import verify

    problems = verify(bundle)
    payload = {"bundle": bundle, "ok": not problems, "problems": problems}
    text = f"{bundle}: ok" if not problems else "\n".join([f"{bundle}: FAILED", *[f"  {p}" for p in problems]])
    _emit(as_json, payload, text)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        click.echo(_one_line(f"edgetl: error: {bundle} failed verification: {problems[0]}{more}"), err=True)
        sys.exit(int(ExitCode.VERIFY_FAILED))


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
    """Latency of a bundle or model: invoke and whole frame, per thread count (--threads 1,2,4 --runs N)."""
    from edgetl.runtime.app import main as runtime_main

    sys.exit(runtime_main(["bench", bundle, *args], prog="edgetl"))
