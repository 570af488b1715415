"""The "Where it runs" section: the bundle's verdicts on the target's CPU (emulated) or a real board,
and a board's latency (``edgetl check --on-target``, ``edgetl bench --ssh``)."""

from __future__ import annotations

from typing import Any

from edgetl.report.view import RunView, badge, esc, pct, section, table


def where_it_runs(view: RunView) -> str:
    stage = view.stages.get("on_target") or {}
    verdicts, boards = stage.get("verdicts", {}), stage.get("boards", {})
    if not verdicts and not boards:
        return ""
    body = ("<p>The bundle's own runtime — its decoding, preprocessing, interpreter and the wheels the board's "
            "pip resolves — on the target's CPU, on the same held-out images as the host's parity check. The "
            "output difference is against the host's int8 model on the host's exact input crops.</p>")  # fmt: skip
    if verdicts:
        rows = [[esc(v.get("target")), esc(v.get("described")), _software(v.get("where", {})), esc(v.get("count")),
                 pct(v.get("top1"), 2), f"{v.get('delta_top1_pp', 0):+.2f}", pct(v.get("agreement"), 2),
                 pct(v.get("agreement_with_host"), 2), _difference(v), badge(v.get("passed"))]
                for v in verdicts.values()]  # fmt: skip
        body += table(["target", "where", "software", "images", "top-1", "Δ top-1 (pp)", "agreement with float",
                       "agreement with host int8", "largest output difference", "verdict"], rows)  # fmt: skip
    if boards:
        rows = []
        for b in boards.values():
            device = b.get("device", {})
            for r in b.get("results", []):
                rows.append([esc(b.get("bundle")), esc(f"{device.get('board')} ({device.get('machine')})"),
                             _software(device), esc(r.get("threads")),
                             f"{r.get('invoke_ms_median', 0):.2f} / {r.get('invoke_ms_p90', 0):.2f}",
                             f"{r.get('frame_ms_median', 0):.2f}"])  # fmt: skip
        body += "<h3>Latency on a board</h3>" + table(
            ["bundle", "board", "software", "threads", "invoke median / p90 ms", "frame median ms"], rows)
    return section("where", "Where it runs", body)


def _software(where: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in sorted((where.get("versions") or {}).items())
                         if k in ("ai-edge-litert", "numpy", "opencv-python-headless", "opencv-python"))  # fmt: skip
    return esc(f"Python {where.get('python', '?')}; {versions}")


def _difference(verdict: dict[str, Any]) -> str:
    steps = verdict.get("max_output_diff_steps")
    text = f"{verdict.get('max_output_diff', 0):.4f}" + (f" ({steps} steps)" if steps is not None else "")
    differing = verdict.get("inputs_differing")
    return esc(text + ("" if differing is None else f"; {differing} input crops made differently"))
