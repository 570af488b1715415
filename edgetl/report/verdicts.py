"""The exported models' sections: parity, the int8 diagnosis and remedies, size and speed, bundles,
and where it all came from."""

from __future__ import annotations

from typing import Any

from edgetl.report.thumbs import chart, tile
from edgetl.report.view import RunView, badge, esc, mib, pct, section, table

SHOWN_DISAGREEMENTS = 24


def parity(view: RunView) -> str:
    report = view.parity
    if not report and "check" in view.stages:
        return section("parity", "Parity", '<p class="muted">The run was checked, but <code>parity.json</code> is '
                       "missing or damaged (see the problems above): <code>edgetl check RUN</code> measures again.</p>")
    if not report:
        hint = "edgetl export RUN" if "export" not in view.stages else "edgetl check RUN"
        return section("parity", "Parity", f'<p class="muted">Not checked yet: <code>{hint}</code>.</p>')
    data, thresholds = report.get("data", {}), report.get("thresholds", {})
    rows = []
    for name, a in report.get("artifacts", {}).items():
        ci = a.get("agreement_ci95") or [None, None]
        sqnr = "–" if a.get("sqnr_db") is None else f"{a['sqnr_db']:.1f} dB"
        rows.append([f"<code>{esc(name)}</code>", esc(a.get("precision", "")), pct(a.get("top1"), 2),
                     f"{a.get('delta_top1_pp', 0):+.2f}", f"{pct(a.get('agreement'), 2)} ({pct(ci[0])}–{pct(ci[1])})",
                     sqnr, badge(a.get("passed"))])  # fmt: skip
    body = (f"<p>Every exported model against the float PyTorch model on {esc(data.get('count'))} images "
            f"({esc(data.get('source', ''))}); pass: top-1 drop ≤ {esc(thresholds.get('max_drop'))} points and "
            f"agreement ≥ {pct(thresholds.get('min_agreement'))}. "
            f"Verdict: {badge(report.get('passed'))}</p>")  # fmt: skip
    body += table(["model", "precision", "top-1", "Δ top-1 (pp)", "agreement (95 % CI)", "logit SQNR", "verdict"], rows)
    body += chart(view.run_dir / "parity.png", "parity of each exported model")
    body += _history(view)
    for name, a in report.get("artifacts", {}).items():
        body += _disagreements(view, name, a)
    return section("parity", "Parity with the float model", body)


def _history(view: RunView) -> str:
    """Every verdict these model files have had (edgetl.check.parity.verdict_history): a failure stays
    on the record after a later, weaker check passes."""
    history = [h for h in view.manifest.get("parity_history") or [] if isinstance(h, dict)]
    if len(history) < 2:
        return ""
    rows = []
    for item in history:
        data, measured = item.get("data") or {}, item.get("artifacts") or {}
        verdicts = " ".join(f"<code>{esc(n)}</code> {badge(a.get('passed'))}" for n, a in measured.items())
        rows.append([esc(item.get("checked_at", "")), esc(f"{data.get('count')} ({data.get('source')})"), verdicts])
    return (f"<details><summary>{len(history)} verdicts these model files have had (package refuses to ship when "
            "one on as many or more images failed)</summary>" + table(["checked", "images", "verdicts"], rows)
            + "</details>")  # fmt: skip


def _disagreements(view: RunView, name: str, artifact: dict[str, Any]) -> str:
    listed = artifact.get("disagreements") or []
    if not listed:
        return ""
    total = round((1 - artifact.get("agreement", 1)) * artifact.get("count", 0))
    ties = artifact.get("near_ties") or {}
    tiles = "".join(
        tile(view.parity_root(), d["image"], f"float <b>{esc(d['float'])}</b> → {esc(d['model'])}"
             f"<br>margin {d['float_margin']:.2f} · true {esc(d['label'])}")
        for d in listed[:SHOWN_DISAGREEMENTS]
    )  # fmt: skip
    within = ties.get("disagreements_within")
    noise = (f" {within} of them are near-ties of the float model (margin below {ties.get('threshold', 0):.2f}, "
             "within this model's rounding noise)." if within is not None else "")  # fmt: skip
    return (f"<h3><code>{esc(name)}</code> disagrees with float on {total} image(s)</h3>"
            f'<p class="muted">The float model\'s surest first; the margin is its top-1 minus top-2 logit.{noise}</p>'
            f'<div class="gallery">{tiles}</div>')  # fmt: skip


def remedies(view: RunView) -> str:
    attempts = (view.parity or {}).get("int8_remedies")
    if not attempts:
        return ""
    body = ""
    for attempt in attempts:
        if attempt.get("remedy") == "diagnosis":
            layers = attempt.get("worst_layers") or []
            if layers:
                head = [esc(k) for k in layers[0]]
                body += "<h3>Diagnosis: the layers with the largest int8 error</h3>"
                body += table(head, [[esc(_short(v)) for v in layer.values()] for layer in layers])
            elif attempt.get("error"):
                body += f"<p>Diagnosis failed: {esc(attempt['error'])}</p>"
    rows = [[esc(a["remedy"]), pct(a.get("agreement"), 2), pct(a.get("top1"), 2), badge(a.get("passed"))]
            for a in attempts if a.get("remedy") != "diagnosis"]  # fmt: skip
    if rows:
        body += "<h3>Remedies tried, in order</h3>" + table(["remedy", "agreement", "top-1", "verdict"], rows)
    return section("remedies", "int8 diagnosis and remedies", body)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def size_and_speed(view: RunView) -> str:
    files = view.manifest.get("files", {})
    bench = view.benchmark or {}
    measured = {row["artifact"]: row for row in bench.get("rows", [])}
    threads = [str(t) for t in bench.get("threads", [])]
    if any(row.get("estimate") for row in measured.values()):
        threads.append("accelerator")
    head = ["model", "size", "top-1", "agreement"] + [
        "accelerator estimate, ms" if t == "accelerator" else f"{t} thread(s): median / p90 ms (speed-up)"
        for t in threads]  # fmt: skip
    names = [n for n in files if n.endswith((".pt", ".onnx", ".tflite"))]
    rows = []
    for name in names + [n for n in measured if n not in files]:
        row = measured.get(name, {})
        size = files.get(name, {}).get("size", row.get("bytes"))
        cells = [f"<code>{esc(name)}</code>" + (" (estimate)" if row.get("estimate") else ""), mib(size),
                 pct(row.get("top1"), 2), pct(row.get("agreement"), 2)]  # fmt: skip
        for t in threads:
            cells.append(_latency((row.get("latency_ms") or {}).get(t), (row.get("speedup") or {}).get(t)))
        rows.append(cells)
    if not rows:
        return ""
    data = bench.get("data", {})
    busy = f'<p><span class="badge fail">busy host</span> {esc(data["warning"])}.</p>' if data.get("warning") else ""
    note = (f"<p>On {esc(bench.get('host', 'this host'))}: single-image latency, {esc(bench.get('runs', ''))} timed "
            f"runs per thread count; accuracy on {esc(data.get('count'))} images ({esc(data.get('source'))}); "
            f"speed-up against {esc(data.get('speedup_baseline'))}. From <code>edgetl benchmark</code>.</p>"
            + busy if bench else
            '<p class="muted">Latency not measured yet: <code>edgetl benchmark RUN</code>.</p>')  # fmt: skip
    return section("speed", "Size and speed", note + table(head, rows))


def _latency(latency: dict[str, Any] | None, speedup: float | None) -> str:
    if not latency:
        return "–"
    text = f"{latency['median']:.2f}"
    if latency.get("p90") is not None:
        text += f" / {latency['p90']:.2f}"
    return text + (f" ({speedup:.2f}×)" if speedup else "")


def bundles(view: RunView) -> str:
    if not view.bundles:
        return ""
    rows, details = [], ""
    for b in view.bundles:
        target, parity_ = b.get("target", {}), b.get("parity") or {}
        flags = " · forced" if b.get("forced") else ""
        flags += " · weak evidence accepted" if parity_.get("evidence_waived") else ""
        flags += " · failed an earlier check" if parity_.get("failed_verdicts") else ""
        rows.append([esc(b.get("name")), esc(target.get("name")), esc(target.get("description", "")),
                     f"<code>{esc(b.get('model'))}</code>", badge(parity_.get("passed")) + esc(flags)])  # fmt: skip
        for kind in ("accelerator", "tflm"):
            report = b.get(kind)
            if report:
                facts = "".join(f"<dt>{esc(k)}</dt><dd>{esc(_short(v))}</dd>" for k, v in report.items()
                                if isinstance(v, (int, float, str)))  # fmt: skip
                details += f"<details><summary>{esc(b.get('name'))}: {kind} report</summary><dl>{facts}</dl></details>"
        if b.get("_archive"):
            details += f'<p class="muted">{esc(b["_archive"])}</p>'
    return section("bundles", "Bundles", table(["bundle", "target", "device", "model", "parity"], rows) + details)


def _calibration(calibration: dict[str, Any]) -> str:
    """The calibration recipe's name and how many images it took, with the set's hash."""
    if not calibration:
        return "–"
    recipe = calibration.get("recipe")
    name = recipe.get("name", "") if isinstance(recipe, dict) else recipe or calibration.get("source", "")
    count = calibration.get("count")
    digest = str(calibration.get("sha256", ""))[:16]
    return f"{name}, {count} images, sha256 {digest}…" if count else str(name)


def _weights(source: object) -> str:
    if isinstance(source, dict):
        return str(source.get("source") or source.get("path") or source)
    return str(source or "–")


def _state(state: str | None) -> str:
    return '<span class="badge fail">' + esc(state.upper()) + "</span>" if state else "ok"


def provenance(view: RunView) -> str:
    finetune, export = view.stages.get("finetune", {}), view.stages.get("export", {})
    data = finetune.get("data", {})
    config = finetune.get("config", {})
    calibration = export.get("calibration") or {}
    versions = {**finetune.get("versions", {}), **export.get("versions", {})}
    facts = [
        ["data", f"{data.get('root', '–')} ({data.get('layout', '')})"],
        ["data fingerprint", data.get("fingerprint", "–")],
        ["seed", config.get("seed", "–")],
        ["initial weights", _weights(finetune.get("weights"))],
        ["calibration", _calibration(calibration)],
        ["parity evidence", ((view.parity or {}).get("data") or {}).get("sha256", "–")],
        ["edgetl", view.manifest.get("edgetl_version", "–")],
        ["versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "–"],
    ]
    files = [[f"<code>{esc(name)}</code>", esc(f.get("stage", "")), mib(f.get("size")),
              f"<code>{esc(f.get('sha256', ''))}</code>", _state(view.file_states.get(name))]
             for name, f in sorted(view.manifest.get("files", {}).items())]  # fmt: skip
    body = table(["", ""], [[esc(k), esc(v)] for k, v in facts], "facts")
    damaged = f", {len(view.file_states)} missing or changed" if view.file_states else ""
    body += f"<details><summary>{len(files)} files of the run, with their sha256{damaged}</summary>"
    body += table(["file", "stage", "size", "sha256", "on disk"], files, "files") + "</details>"
    return section("provenance", "Provenance", body)
