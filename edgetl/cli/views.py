"""Commands that show a run: ``edgetl report`` (one self-contained HTML page)."""

from __future__ import annotations

import click

from edgetl.cli.commands import Listing, finish, main, report_after
from edgetl.cli.edge import cache_dir_option
from edgetl.errors import RunDirError


@main.command("report")
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--bundle", "bundles", multiple=True, type=click.Path(path_type=str),
              help="Also show this bundle folder (bundles under RUN_DIR/bundles are found by themselves).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def report_command(run_dir: str, bundles: tuple[str, ...], as_json: bool) -> None:
    """Write RUN_DIR/report.html: training, per-class accuracy and mistakes, parity and the images int8
    gets wrong, remedies, size and speed, bundles and provenance, in one file that opens offline."""
    from pathlib import Path

    from edgetl.report import write_report
    from edgetl.rundir import MANIFEST_NAME

    if not (Path(run_dir) / MANIFEST_NAME).is_file():
        raise RunDirError(f"{run_dir} is not an edgetl run (no {MANIFEST_NAME})")
    path = write_report(run_dir, bundles)
    finish(as_json, Listing({"report": str(path)}), str(path))


def _thread_counts(value: str) -> list[int]:
    from edgetl.runtime.classifier import too_many_threads

    try:
        counts = [int(part) for part in value.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected thread counts like 1,2,4, got {value!r}", param_hint="'--threads'")
    refused = too_many_threads(max(counts))
    if refused:
        raise click.BadParameter(refused, param_hint="'--threads'")
    return counts


@main.command("benchmark")
@cache_dir_option
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option("--threads", default="1,2,4", show_default=True, help="Thread counts to time, comma-separated.")
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="Measure accuracy on this folder (DATA/<class>/...) instead of the run's val split.")
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Timed single-image runs per model and thread count.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def benchmark_command(run_dir: str, threads: str, data: str | None, runs: int, as_json: bool) -> None:
    """Every model of RUN_DIR in one table: size, top-1, agreement with float, latency per thread count on
    this host, speed-up against float. Writes RUN_DIR/benchmark.json and benchmark.md."""
    from edgetl.errors import require

    require("torch", "train")
    from edgetl.check.benchmark import benchmark, benchmark_markdown

    counts = _thread_counts(threads)
    report = benchmark(run_dir, counts, data, runs)
    report_after(run_dir)
    finish(as_json, report, benchmark_markdown(report))
