"""``DIR/report.html`` of a search: the winner, the Pareto front of int8 top-1 against latency (an inline
SVG chart: one file that opens offline) and every trial in a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetl.report.page import STYLE
from edgetl.report.view import esc, pct
from edgetl.rundir import atomic_write

REPORT = "report.html"
COLOURS = {"complete": "#17803d", "over-budget": "#c0392b", "parity-failed": "#d68910"}
W, H, PAD = 640, 320, 48


def write_page(out: Path, summary: dict[str, Any]) -> Path:
    rows, front = summary["trials"], set(summary["pareto"])
    best = summary.get("best")
    winner = next((r for r in rows if best and r["number"] == best["number"]), None)
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>edgetl search · {esc(out.resolve().name)}</title><style>{STYLE}</style></head><body><main>"
            f"<h1>edgetl search <code>{esc(out.resolve().name)}</code></h1>{_summary(summary, winner)}"
            f"<h2>Pareto front</h2>{_chart(rows, front, summary)}<h2>Trials</h2>{_table(rows, front)}"
            f'<p class="muted">Written by edgetl search from <code>{esc(out.resolve())}</code>; every trial is in '
            "<code>search.json</code>.</p></main></body></html>\n")  # fmt: skip
    path = out / REPORT
    atomic_write(path, page)
    return path


def _summary(summary: dict[str, Any], winner: dict[str, Any] | None) -> str:
    budget, how = summary["budget"], summary["latency_on"]["how"]
    limits = [f"latency ≤ {budget['max_latency_ms']:.3g} ms" if budget.get("max_latency_ms") else "",
              f"model ≤ {budget['max_model_bytes'] / 1000:,.0f} kB" if budget.get("max_model_bytes") else "",
              f"arena ≤ {budget['max_arena_bytes'] / 1000:,.0f} kB" if budget.get("max_arena_bytes") else ""]
    counts: dict[str, int] = {}
    for row in summary["trials"]:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    cards = [("target", esc(summary["target"])), ("budget", esc(", ".join(x for x in limits if x) or "none")),
             ("trials", esc(", ".join(f"{n} {s}" for s, n in sorted(counts.items()))))]  # fmt: skip
    if winner:
        p = winner["params"]
        cards.insert(0, ("best int8 top-1 (validation)", f"{pct(winner['int8_top1'])}"))
        cards.insert(1, ("its shape and latency", esc(f"{p['image_size']} px, width {p['width']:g}, "
                                                       f"{winner['latency']['ms']:.3g} ms")))  # fmt: skip
    html = '<div class="cards">' + "".join(f"<div class=card><b>{v}</b><span>{esc(k)}</span></div>"
                                            for k, v in cards) + "</div>"  # fmt: skip
    html += f'<p class="muted">Latency: {esc(how)}.</p>'
    if winner:
        html += (f"<p>The winner is trial {winner['number']}, copied to <code>best/</code>: a normal run that "
                 "<code>edgetl export</code>, <code>check</code> and <code>package</code> take.</p>")
    else:
        html += '<p class="problems">No trial produced an int8 model within budget that passed parity.</p>'
    return html


def _chart(rows: list[dict[str, Any]], front: set[int], summary: dict[str, Any]) -> str:
    points = [r for r in rows if r.get("int8_top1") is not None and r.get("latency")]
    if not points:
        return '<p class="muted">No trial has an int8 model yet.</p>'
    limit = summary["budget"].get("max_latency_ms")
    xs = [r["latency"]["ms"] for r in points] + ([limit] if limit else [])
    # the axis spans the models worth comparing (15 points below the best); worse ones sit on it, hollow
    floor = max(0.0, max(r["int8_top1"] for r in points) - 0.15)
    ys = [max(r["int8_top1"], floor) for r in points]
    x0, x1 = 0.0, max(xs) * 1.1
    y0, y1 = max(0.0, min(ys) - 0.02), min(1.0, max(ys) + 0.02)
    y1 = y1 if y1 > y0 else y0 + 0.01

    def x(v: float) -> float:
        return PAD + (v - x0) / (x1 - x0) * (W - 2 * PAD)

    def y(v: float) -> float:
        return H - PAD - (v - y0) / (y1 - y0) * (H - 2 * PAD)

    parts = [f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="currentColor"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="currentColor"/>',
             f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle" font-size="12">latency on the target (ms)</text>',
             f'<text x="14" y="{H / 2}" font-size="12" transform="rotate(-90 14 {H / 2})" text-anchor="middle">'
             "int8 top-1 (validation)</text>",
             f'<text x="{PAD}" y="{H - PAD + 16}" font-size="11">0</text>',
             f'<text x="{W - PAD}" y="{H - PAD + 16}" font-size="11" text-anchor="end">{x1:.3g}</text>',
             f'<text x="{PAD - 4}" y="{y(y1) + 4}" font-size="11" text-anchor="end">{y1:.0%}</text>',
             f'<text x="{PAD - 4}" y="{y(y0) + 4}" font-size="11" text-anchor="end">{y0:.0%}</text>']  # fmt: skip
    if limit:
        parts.append(f'<line x1="{x(limit)}" y1="{PAD}" x2="{x(limit)}" y2="{H - PAD}" stroke="#c0392b" '
                     f'stroke-dasharray="4 3"/><text x="{x(limit) - 4}" y="{PAD + 10}" font-size="11" '
                     f'fill="#c0392b" text-anchor="end">budget {limit:.3g} ms</text>')  # fmt: skip
    on_front = sorted((r for r in points if r["number"] in front), key=lambda r: r["latency"]["ms"])
    if len(on_front) > 1:
        path = " ".join(f"{x(r['latency']['ms']):.1f},{y(max(r['int8_top1'], floor)):.1f}" for r in on_front)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#17803d" stroke-opacity=".5"/>')
    for r in points:
        colour = COLOURS.get(r["status"], "#8a949e")
        radius = 4 + min(8.0, r["bytes"] / 500_000)
        p = r["params"]
        tip = (f"trial {r['number']}: {p['image_size']} px w{p['width']:g} {p['strategy']}, int8 "
               f"{r['int8_top1']:.1%}, {r['latency']['ms']:.3g} ms, {r['bytes'] / 1000:,.0f} kB, {r['status']}")
        ring = ' stroke="currentColor" stroke-width="2"' if r["number"] in front else ""
        below = r["int8_top1"] < floor
        fill = f'fill="none" stroke="{colour}"' if below else f'fill="{colour}" fill-opacity=".75"'
        parts.append(f'<circle cx="{x(r["latency"]["ms"]):.1f}" cy="{y(max(r["int8_top1"], floor)):.1f}" '
                     f'r="{radius:.1f}" {fill}{ring}><title>{esc(tip)}</title></circle>')  # fmt: skip
    legend = ("Green: complete; red: over budget; orange: failed parity; hollow on the axis: more than 15 points "
              "below the best. A ringed point is on the Pareto front (no other trial is at once as accurate, faster "
              "and smaller); a point's area grows with the model's size.")
    return (f'<svg viewBox="0 0 {W} {H}" width="{W}" role="img" aria-label="Pareto front" '
            f'style="max-width:100%;height:auto">{"".join(parts)}</svg><p class="muted">{legend}</p>')


def _table(rows: list[dict[str, Any]], front: set[int]) -> str:
    head = ("<tr><th>#</th><th>size</th><th>width</th><th>strategy</th><th>lr</th><th>label smoothing</th>"
            "<th>val top-1 (float)</th><th>int8 top-1</th><th>latency (ms)</th><th>size (kB)</th><th>epochs</th>"
            "<th>status</th><th>seconds</th></tr>")  # fmt: skip
    body = []
    for r in rows:
        p = r.get("params") or {}
        latency = r.get("latency") or {}
        lat = f"{latency['ms']:.3g}" if latency else ""
        if latency and latency.get("low") != latency.get("high"):
            lat += f" ({latency['low']:.3g}–{latency['high']:.3g})"
        cells = [f"{r['number']}{' ★' if r['number'] in front else ''}", p.get("image_size", ""),
                 f"{p['width']:g}" if "width" in p else "", p.get("strategy", ""),
                 f"{p['lr']:.2g}" if "lr" in p else "", f"{p['label_smoothing']:.2f}" if "label_smoothing" in p else "",
                 pct(r.get("val_top1")) if r.get("val_top1") is not None else "",
                 pct(r.get("int8_top1")) if r.get("int8_top1") is not None else "", lat,
                 f"{r['bytes'] / 1000:,.0f}" if r.get("bytes") else "", r.get("epochs", ""),
                 r["status"] + (f": {r['reason']}" if r.get("reason") else ""), r.get("seconds", "")]  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    return f'<div class="scroll"><table>{head}{"".join(body)}</table></div><p class="muted">★ on the Pareto front.</p>'
