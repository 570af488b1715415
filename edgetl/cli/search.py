"""``edgetl search``: the most accurate int8 model within a target's latency, size and memory budget."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import click

from edgetl.cli.commands import WEIGHTS_ENV, finish, load_target, main
from edgetl.cli.edge import POSITIVE, Finite, cache_dir_option
from edgetl.errors import ConfigError, require

# The stages a trial runs log every epoch and export step; a search shows one line per trial unless -v.
TRIAL_LOGGERS = ("edgetl.train", "edgetl.data", "edgetl.export", "edgetl.quantize", "edgetl.check", "edgetl.pipeline",
                 "edgetl.package", "edgetl.report")  # fmt: skip


def _numbers(kind: type, text: str | None, option: str) -> tuple[Any, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(kind(part) for part in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list like {'96,128,160' if kind is int else '1.0,0.5'}, "
                                 f"got {text!r}", param_hint=f"'{option}'") from None  # fmt: skip
    return values


@main.command("search")
@cache_dir_option
@click.argument("data", type=click.Path(path_type=str))
@click.option("--out", "out", required=True, type=click.Path(path_type=str),
              help="Search folder: trials/, the study, search.json, report.html and best/.")
@click.option("--target", required=True, help="The target the model must fit (a name in targets/ or a .toml).")
@click.option("--max-latency-ms", type=POSITIVE, default=None, help="Latency budget on the target, per image.")
@click.option("--max-model-kb", type=POSITIVE, default=None,
              help="Model file budget in kB (1000 bytes) [the target's max_model_bytes].")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True,
              help="Trials in the study (all its processes together).")
@click.option("--time-budget", "minutes", type=POSITIVE, default=None,
              help="Minutes this process searches, exports included: the trial under way finishes with its best "
                   "epoch in time to be exported.")
@click.option("--latency-on", default=None,
              help="host (this machine, 1 thread) | target (this machine x the target's factor) | ssh:HOST (the "
                   "board) [target: measured here for a target of this machine's architecture].")
@click.option("--sizes", default=None, help="Input sides to try, e.g. 96,128,160 [every size the target takes].")
@click.option("--widths", default=None, help="Width multipliers to try [the target's width, else 1.0,0.5].")
@click.option("--weights", default=None,
              help=f"Width 1.0's initial weights: imagenet | none | PATH [${WEIGHTS_ENV}, else imagenet].")
@click.option("--head-epochs", type=click.IntRange(min=0), default=None, help="Phase 1 epochs of every trial [5].")
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=None, help="Phase 2 epochs of every trial [10].")
@click.option("--patience", type=click.IntRange(min=0), default=None, help="Early-stopping patience [3].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size [32].")
@click.option("--val-fraction", type=Finite(min=0, max=1, min_open=True, max_open=True), default=None,
              help="Held out when there is no val/ [0.2].")
@click.option("--seed", type=int, default=None, help="Random seed of the data split, training and sampler [0].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[auto]")
@click.option("--resume", is_flag=True,
              help="Continue the search in --out with its stored settings, or join it from another process.")
@click.option("--storage", default=None,
              help="An Optuna storage URL (sqlite:///..., postgresql://...) instead of --out/study.journal, for "
                   "processes on several machines (--out then on a shared filesystem).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.pass_context
def search_command(ctx: click.Context, data: str, out: str, target: str, max_latency_ms: float | None,
                   max_model_kb: float | None, trials: int, minutes: float | None, latency_on: str | None,
                   sizes: str | None, widths: str | None, weights: str | None, resume: bool, storage: str | None,
                   as_json: bool, **recipe: Any) -> None:  # fmt: skip
    """Search input size, width, strategy, learning rate and label smoothing for the most accurate int8 model
    within a latency, size and memory budget on TARGET. Every trial is a normal fine-tune in
    OUT/trials/NNN, pruned early when its validation loss lags; the winner, checked by the parity gate, is
    copied to OUT/best. Exits 4 when no trial fits the budget.
    """
    started = time.monotonic()  # --time-budget counts from here, importing torch and TensorFlow included
    require("torch", "train")
    require("optuna", "train")
    require("tensorflow", "export", import_it=False)
    from edgetl import render
    from edgetl.search.latency import latency_on as parse_latency_on
    from edgetl.search.shapes import Budget
    from edgetl.search.space import build_space
    from edgetl.search.study import search

    spec = load_target(target)
    if spec.precision != "int8":
        raise ConfigError(f"edgetl search picks an int8 model; {spec.name} ships {spec.artifact}",
                          hint="search for an int8 target (see edgetl targets)")  # fmt: skip
    space = build_space(spec.input.accepted, _numbers(int, sizes, "--sizes"), _numbers(float, widths, "--widths"),
                        spec.model.width, spec.name)  # fmt: skip
    limits = [x for x in (spec.constraints.max_model_bytes, max_model_kb and int(max_model_kb * 1000)) if x]
    budget = Budget(max_latency_ms, min(limits) if limits else None, spec.constraints.max_arena_bytes)
    weights = weights or os.environ.get(WEIGHTS_ENV) or "imagenet"
    recipe = {k: v for k, v in recipe.items() if v is not None}
    if not (ctx.obj or {}).get("verbose"):
        for name in TRIAL_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    bar = sys.stderr.isatty() and not as_json and logging.getLogger("edgetl").level <= logging.INFO
    result = search(data, out, spec, space, budget, parse_latency_on(latency_on, spec), trials=trials,
                    minutes=minutes, recipe=recipe, weights=weights, resume=resume, storage_url=storage,
                    progress=bar, started=started)  # fmt: skip
    finish(as_json, result, render.search_summary(result))
