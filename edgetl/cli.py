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
from edgetl.errors import EdgetlError, ExitCode, require

log = logging.getLogger("edgetl")

WEIGHTS_ENV = "EDGETL_WEIGHTS"


class EdgetlGroup(click.Group):
    """Click group that turns library errors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgetlError as exc:
            if (ctx.obj or {}).get("traceback"):
                raise
            hint = f" (hint: {exc.hint})" if exc.hint else ""
            click.echo(f"edgetl: error: {exc.message}{hint}", err=True)
            ctx.exit(int(exc.exit_code))
        except KeyboardInterrupt:
            click.echo("edgetl: interrupted", err=True)
            ctx.exit(int(ExitCode.INTERRUPTED))


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
    5 missing dependency, 130 interrupted.
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
@click.option("--width", type=float, default=None, help="MobileNetV2 width multiplier [1.0].")
@click.option("--image-size", type=int, default=None, help="Square input side in pixels [224].")
@click.option("--head-epochs", type=int, default=None, help="Phase 1 epochs, backbone frozen [5].")
@click.option("--finetune-epochs", type=int, default=None, help="Phase 2 epochs, unfrozen [10].")
@click.option("--unfreeze-from", type=int, default=None,
              help="First `features` block trained in phase 2 [last third]; 0 = all.")
@click.option("--lr", type=float, default=None, help="Head learning rate in phase 1 [1e-3].")
@click.option("--finetune-lr", type=float, default=None, help="Head LR in phase 2 [lr/10].")
@click.option("--backbone-lr-mult", type=float, default=None, help="Backbone LR = head LR x this [0.1].")
@click.option("--bn", type=click.Choice(["frozen", "train"]), default=None,
              help="BatchNorm statistics in phase 2 [frozen].")
@click.option("--patience", type=int, default=None, help="Early-stopping patience, phase 2 [3].")
@click.option("--batch-size", type=int, default=None, help="Batch size [32].")
@click.option("--label-smoothing", type=float, default=None, help="Label smoothing [0.1].")
@click.option("--flip/--no-flip", default=None, help="Random horizontal flips [on].")
@click.option("--val-fraction", type=float, default=None, help="Held out when there is no val/ [0.2].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[auto]")
@click.option("--seed", type=int, default=None, help="Random seed [0].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def finetune(data: str, run_dir: str, resume: bool, as_json: bool, **options: Any) -> None:
    """Fine-tune MobileNetV2 on an image folder (freeze, then unfreeze).

    DATA is DATA/<class>/images or DATA/train/<class>/ + DATA/val/<class>/; DATA/test/ is only
    used for a final, separate evaluation.
    """
    require("torch", "train")
    require("torchvision", "train")
    from edgetl.config import FinetuneConfig
    from edgetl.train import finetune as run_finetune

    if options["weights"] is None and not resume:
        options["weights"] = os.environ.get(WEIGHTS_ENV) or None
    cfg = FinetuneConfig.build(options) if not resume else None
    result = run_finetune(data, run_dir, cfg or FinetuneConfig(), resume=resume, overrides=options)
    _emit(as_json, result.to_dict(), _finetune_summary(result))


@main.command()
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="Use this image folder instead of the generated dataset.")
@click.option("--out", "out_dir", type=click.Path(path_type=str), default="runs/demo",
              show_default=True, help="Where the dataset and the run go.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def demo(data: str | None, out_dir: str, as_json: bool) -> None:
    """Run the pipeline end to end on a generated dataset (CPU-friendly, a few minutes)."""
    require("torch", "train")
    from edgetl.demo import run_demo

    result = run_demo(out_dir, data=data, weights=os.environ.get(WEIGHTS_ENV))
    _emit(as_json, result.to_dict(), result.summary())
