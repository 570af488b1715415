"""Assemble ``report.html``: the summary first (what a user wants to know at a glance), then the
sections in pipeline order. One file, inline CSS, data-URI images; it reads the same on a phone."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edgetl.report.devices import where_it_runs
from edgetl.report.training import classes, mistakes, training
from edgetl.report.verdicts import bundles, parity, provenance, remedies, size_and_speed
from edgetl.report.view import RunView, badge, esc, load_view, pct
from edgetl.rundir import atomic_write

log = logging.getLogger(__name__)

REPORT = "report.html"

STYLE = """
:root{--fg:#1d232a;--muted:#5d6873;--line:#d9dee3;--bg:#fff;--panel:#f5f7f9;--pass:#17803d;--fail:#c0392b}
*{box-sizing:border-box}body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}main{max-width:1100px;margin:0 auto;padding:16px}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;border-bottom:1px solid var(--line);padding-bottom:4px;
margin-top:1.8em}h3{font-size:1em;margin:1.2em 0 .4em}code{font-size:.9em;word-break:break-all}
nav{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:.9em;margin:8px 0 0}nav a{color:var(--muted)}
.muted{color:var(--muted)}
.problems{border:2px solid var(--fail);border-radius:8px;padding:8px 12px;margin:12px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:10px;margin:14px 0}
.card{background:var(--panel);border-radius:8px;padding:10px 12px}.card b{display:block;font-size:1.35em}
.card>span{color:var(--muted);font-size:.85em}
.badge{display:inline-block;border-radius:4px;padding:0 6px;font-weight:600;font-size:.85em;color:#fff}
.card b .badge{font-size:.75em;padding:2px 8px}.badge.pass{background:var(--pass)}
.badge.fail{background:var(--fail)}.badge.none{background:#8a949e}
.scroll{overflow-x:auto}table{border-collapse:collapse;margin:8px 0;font-size:.92em}
th,td{border-bottom:1px solid var(--line);padding:4px 10px 4px 0;text-align:left;vertical-align:top}
table.facts td:first-child{color:var(--muted);white-space:nowrap}table.files td{font-size:.85em}
img.chart{max-width:min(100%,860px);height:auto;display:block;margin:8px 0}
.pair{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.pair img.chart{max-width:min(100%,520px)}
.bar{display:inline-block;width:80px;height:8px;background:var(--line);border-radius:4px;vertical-align:middle}
.bar span{display:block;height:100%;background:var(--pass);border-radius:4px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(112px,1fr));gap:10px}
.tile{margin:0;font-size:.8em}.tile img,.tile .missing{width:96px;height:96px;object-fit:cover;border-radius:4px;
display:block;background:var(--panel)}.tile .missing{display:flex;align-items:center;justify-content:center;
color:var(--muted)}.tile .file{display:block;color:var(--muted);word-break:break-all}
details{margin:8px 0}summary{cursor:pointer;color:var(--muted)}dl{display:grid;grid-template-columns:auto 1fr;
gap:2px 12px;font-size:.9em}dt{color:var(--muted)}dd{margin:0;word-break:break-all}
@media (prefers-color-scheme:dark){:root{--fg:#e4e8ec;--muted:#9aa5b0;--line:#38414a;--bg:#15191d;--panel:#20262c}}
"""


def write_report(run_dir: str | os.PathLike, bundle_dirs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write ``RUN/report.html`` from what the run holds now (and the bundles in ``bundle_dirs`` besides
    those under ``RUN/bundles``); returns its path."""
    run_dir = Path(run_dir)
    view = load_view(run_dir, bundle_dirs)
    for problem in view.problems:
        log.warning("report: %s", problem)
    sections = (training, classes, mistakes, parity, remedies, where_it_runs, size_and_speed, bundles, provenance)
    body = "".join(part(view) for part in sections)
    name = esc(run_dir.resolve().name)
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>edgetl · {name}</title><style>{STYLE}</style></head><body><main>"
            f"<h1>edgetl run <code>{name}</code></h1>{_problems(view)}{_summary(view)}{_nav(body)}{body}"
            f'<p class="muted">Written by edgetl {esc(view.manifest.get("edgetl_version", ""))} from '
            f"<code>{esc(run_dir.resolve())}</code>. Re-write it with <code>edgetl report RUN</code>.</p>"
            "</main></body></html>\n")  # fmt: skip
    path = run_dir / REPORT
    atomic_write(path, page)
    return path


def _summary(view: RunView) -> str:
    """The cards a user reads first: how good the float model is, whether its exports pass, where it ships."""
    finetune = view.stages.get("finetune", {})
    count = (view.metrics or {}).get("val", {}).get("count", "–")
    cards = [(pct(finetune.get("val_top1")), f"float val top-1 ({count} images)")]
    if finetune.get("test_top1") is not None:
        cards.append((pct(finetune["test_top1"]), "float test top-1"))
    strategy = (finetune.get("strategy") or {}).get("used")
    if strategy:
        cards.append((esc(strategy), "transfer strategy"))
    artifacts = (view.parity or {}).get("artifacts", {})
    int8 = artifacts.get("model_int8.tflite")
    if int8:
        cards.append((pct(int8.get("agreement"), 2), "int8 agreement with float"))
    if view.parity:
        failed = [n for n, a in artifacts.items() if not a.get("passed")]
        verdict = badge(view.parity.get("passed"))
        failing = f"; failing: {', '.join(failed)}" if failed else ""
        cards.append((verdict, f"parity, {len(artifacts)} models{failing}"))
    verdicts = (view.stages.get("on_target") or {}).get("verdicts", {})
    if verdicts:
        failed = [v["target"] for v in verdicts.values() if not v.get("passed")]
        cards.append((badge(not failed), f"where it runs: {len(verdicts)} verdict(s)"
                      + (f"; failing: {', '.join(failed)}" if failed else "")))  # fmt: skip
    if view.bundles:
        names = ", ".join(str(b.get("target", {}).get("name")) for b in view.bundles)
        cards.append((str(len(view.bundles)), f"bundles: {names}"))
    tiles = "".join(f'<div class="card"><b>{value}</b><span>{esc(what)}</span></div>' for value, what in cards)
    return f'<div class="cards">{tiles}</div>'


def _problems(view: RunView) -> str:
    """What is missing or damaged, before anything else: the page must not read as a healthy run."""
    if not view.problems:
        return ""
    items = "".join(f"<li>{esc(p)}</li>" for p in view.problems)
    return (f'<div class="problems"><b>This run is damaged or incomplete ({len(view.problems)} '
            f"problem{'s' if len(view.problems) > 1 else ''}):</b><ul>{items}</ul></div>")


def _nav(body: str) -> str:
    import re

    links = re.findall(r'<section id="([^"]+)"><h2>([^<]+)</h2>', body)
    return "<nav>" + "".join(f'<a href="#{anchor}">{title}</a>' for anchor, title in links) + "</nav>"
