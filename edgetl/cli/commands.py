"""The ``edgetl`` command line: a thin layer over the library.

Only light modules are imported here; each command imports its stage (torch, tensorflow, ...) when it
runs, so ``edgetl --help`` starts fast and works without the heavy extras. Errors from the library
(:class:`edgetl.errors.EdgetlError`) are caught once, in :class:`EdgetlGroup`, and become one line on
stderr and a documented exit code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from edgetl import __version__
from edgetl.cli.edge import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    EdgetlGroup,
    Finite,
    cache_dir_option,
    one_line,
    setup_logging,
    without_option,
)
from edgetl.errors import ExitCode, require

log = logging.getLogger("edgetl")

WEIGHTS_ENV = "EDGETL_WEIGHTS"


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
    ctx.obj = {"traceback": traceback, "verbose": verbose}
    setup_logging(verbose, quiet)


def _render() -> Any:
    from edgetl import render

    return render


def finish(as_json: bool, result: Any, text: str) -> None:
    """Print a command's result (JSON or text) and exit with the code the result carries: the one
    place where results become exit codes."""
    payload = result.to_dict()
    click.echo(json.dumps(payload, sort_keys=True, default=str) if as_json else text)
    code = int(getattr(result, "exit_code", ExitCode.OK))
    if code:
        sys.exit(code)


def report_after(run_dir: str, bundles: tuple[str, ...] = ()) -> None:
    """Re-write the run's report.html after a stage (edgetl.report). A page that cannot be written is a
    warning: the stage itself succeeded or failed on its own terms."""
    from edgetl.report import write_report

    try:
        log.info("report: %s", write_report(run_dir, bundles))
    except Exception as exc:  # noqa: BLE001 - the stage's result stands either way
        log.warning("report.html not written: %s", one_line(str(exc) or type(exc).__name__))


class Listing:
    """A result that is only data (target listings, the QAT record)."""

    def __init__(self, payload: dict[str, Any]):
        self.payload = payload

    def to_dict(self) -> dict[str, Any]:
        return self.payload


def load_target(name: str) -> Any:
    from edgetl.targets import load_target as load

    return load(name)


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
@click.option("--strategy", type=click.Choice(["auto", "feature-extraction", "partial", "full", "whole"]),
              default=None,
              help="How much of the backbone phase 2 trains: the head only, the last third (partial), every block "
                   "with layer-wise rates thawed top-down (full), every block at the head's rate (whole), or auto: "
                   "feature extraction and whole race the first --probe-epochs of phase 2 on the validation split "
                   "and the winner continues [auto; partial whenever --unfreeze-from or --backbone-lr-mult is "
                   "given, full whenever --layer-decay or --unfreeze-epochs is].")
@click.option("--unfreeze-from", type=int, default=None,
              help="partial: first `features` block trained in phase 2 [last third]; 0 = all.")
@click.option("--lr", type=POSITIVE, default=None, help="Head learning rate in phase 1 [1e-3].")
@click.option("--finetune-lr", type=POSITIVE, default=None, help="Head LR in phase 2 [lr/10].")
@click.option("--backbone-lr-mult", type=POSITIVE, default=None,
              help="partial: backbone LR = head LR x this [0.1].")
@click.option("--layer-decay", type=Finite(min=0, max=1, min_open=True), default=None,
              help="full: each block's LR = the next higher block's x this [0.9].")
@click.option("--unfreeze-epochs", type=click.IntRange(min=1), default=None,
              help="full: phase-2 epochs over which blocks are thawed from the top down [3].")
@click.option("--probe-epochs", type=click.IntRange(min=1), default=None,
              help="auto: phase-2 epochs each raced strategy runs before the choice [2].")
@click.option("--bn", type=click.Choice(["frozen", "train"]), default=None,
              help="BatchNorm statistics in phase 2 [frozen].")
@click.option("--patience", type=int, default=None, help="Early-stopping patience, phase 2 [3].")
@click.option("--batch-size", type=int, default=None, help="Batch size [32].")
@click.option("--label-smoothing", type=Finite(min=0, max=1, max_open=True), default=None,
              help="Label smoothing [0.1].")
@click.option("--flip/--no-flip", default=None, help="Random horizontal flips [on].")
@click.option("--val-fraction", type=Finite(min=0, max=1, min_open=True, max_open=True), default=None,
              help="Held out when there is no val/ [0.2].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[auto]")
@click.option("--seed", type=int, default=None, help="Random seed [0].")
@click.option("--compile/--no-compile", default=None, help="torch.compile the model (CUDA only) [off].")
@click.option("--data-placement", type=click.Choice(["auto", "device", "stream"]), default=None,
              help="Training images on a GPU: copied to it, or streamed from host memory [auto: by size].")
@cache_dir_option
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
        from edgetl.train.distributed import launch

        sys.exit(launch(nproc, without_option(sys.argv[1:], "--nproc")))
    from edgetl.config import FinetuneConfig, finetune_layer
    from edgetl.train.finetune import finetune as run_finetune

    if options["weights"] is None and not resume:
        options["weights"] = os.environ.get(WEIGHTS_ENV) or None
    if options["strategy"] is None and not resume:  # an option of one strategy chooses it
        if options["unfreeze_from"] is not None or options["backbone_lr_mult"] is not None:
            options["strategy"] = "partial"
        elif options["layer_decay"] is not None or options["unfreeze_epochs"] is not None:
            options["strategy"] = "full"
    refuse_ignored_options(options)
    from_target = finetune_layer(load_target(target)) if target is not None else {}
    # Precedence, highest on the right: defaults < target file < flags.
    cfg = FinetuneConfig.build(from_target, options) if not resume else None
    result = run_finetune(data, run_dir, cfg or FinetuneConfig(), resume=resume, overrides=options)
    if result is None:  # a rank other than 0 of a distributed run: rank 0 reports
        return
    report_after(run_dir)
    finish(as_json, result, _render().finetune_summary(result))


# The strategies each strategy-specific option is used by (edgetl.train.strategy).
STRATEGY_OPTIONS = {"unfreeze_from": ("partial",), "backbone_lr_mult": ("partial",), "layer_decay": ("full",),
                    "unfreeze_epochs": ("full",), "probe_epochs": ("auto",)}  # fmt: skip


def refuse_ignored_options(options: dict[str, Any]) -> None:
    """An option the chosen --strategy would ignore is a usage error, not a silent no-op."""
    strategy = options.get("strategy")
    for name, used_by in STRATEGY_OPTIONS.items():
        if strategy is not None and options.get(name) is not None and strategy not in used_by:
            flag = "--" + name.replace("_", "-")
            raise click.UsageError(f"{flag} applies to --strategy {' or '.join(used_by)}; with --strategy "
                                   f"{strategy} it would be ignored")  # fmt: skip


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

    result = run_demo(out_dir, data=data, weights=os.environ.get(WEIGHTS_ENV), with_export=with_export)
    finish(as_json, result, _render().demo_summary(result))


@main.command()
@cache_dir_option
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
    from edgetl.check.report_md import next_steps
    from edgetl.config import export_config
    from edgetl.pipeline import export_and_check

    cfg = export_config(load_target(target) if target is not None else None, int8=int8, max_drop=max_drop,
                        min_agreement=min_agreement, calib=calib or "default", calib_dir=calib_dir,
                        remedies=not no_remedies, bias_correction=bias_correction, equalize=equalize,
                        converter=converter)  # fmt: skip
    result = export_and_check(run_dir, cfg, data)
    int8_verdict = result.parity.artifacts.get("model_int8.tflite")
    steps = next_steps(run_dir, int8_verdict) if int8_verdict is not None and not int8_verdict["passed"] else []
    report_after(run_dir)
    finish(as_json, result, _render().export_text(result, run_dir, steps))


@main.command("qat")
@cache_dir_option
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
    from edgetl.config import QATConfig
    from edgetl.quantize.qat import quantization_aware_finetune

    settings = QATConfig(epochs=epochs, lr=lr, calib=calib, consistency=consistency, distill=distill)
    record = quantization_aware_finetune(run_dir, out_dir, settings)
    report_after(out_dir)
    finish(as_json, Listing({"run_dir": out_dir, **record}), _render().qat_text(record, out_dir))


@main.group("targets", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.pass_context
def targets_group(ctx: click.Context, as_json: bool) -> None:
    """List the edge targets (targets/*.toml); `targets show NAME` prints one."""
    if ctx.invoked_subcommand is not None:
        return
    from edgetl.targets import all_targets

    found = all_targets()
    payload = {"targets": [{"name": t.name, "runtime": t.runtime, "precision": t.precision,
                            "description": t.description, "file": t.source} for t in found]}  # fmt: skip
    finish(as_json, Listing(payload), _render().targets_table(found))


@targets_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def targets_show(name: str, as_json: bool) -> None:
    """Print one target, resolved (NAME or a path to a .toml file)."""
    target = load_target(name)
    finish(as_json, Listing({**target.to_dict(), "file": target.source}), _render().target_text(target))


@targets_group.command("stamp")
@click.argument("name")
@click.argument("stage", type=click.Choice(["finetune", "export", "package"]))
def targets_stamp(name: str, stage: str) -> None:
    """Print the part of a target that STAGE depends on (for make's content stamps)."""
    target = load_target(name).to_dict()
    parts = {
        "finetune": ("input", "model"),
        "export": ("input", "model", "artifact", "quantization", "parity"),
        "package": tuple(target),
    }[stage]
    click.echo(json.dumps({k: target[k] for k in parts}, sort_keys=True))
