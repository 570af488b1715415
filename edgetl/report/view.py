"""What the page shows, read from the run folder: each file optional, so a page can be written after
any stage (after finetune there is no parity yet)."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.rundir import bundle_manifest, read_manifest, run_bundles


@dataclass
class RunView:
    run_dir: Path
    manifest: dict[str, Any]
    metrics: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    benchmark: dict[str, Any] | None = None
    bundles: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stages(self) -> dict[str, Any]:
        return self.manifest.get("stages", {})

    @property
    def data_root(self) -> Path | None:
        """The dataset folder the thumbnails come from (the run's, or the parity check's ``--data``)."""
        root = self.stages.get("finetune", {}).get("data", {}).get("root")
        return Path(root) if root and Path(root).is_dir() else None

    def parity_root(self) -> Path | None:
        root = (self.parity or {}).get("data", {}).get("root")
        return Path(root) if root and Path(root).is_dir() else self.data_root


def load_view(run_dir: Path, extra_bundles: tuple[str | os.PathLike, ...] = ()) -> RunView:
    view = RunView(run_dir, read_manifest(run_dir))
    view.metrics = _json(run_dir / "metrics.json")
    view.parity = _json(run_dir / "parity.json")
    view.benchmark = _json(run_dir / "benchmark.json")
    found = run_bundles(run_dir) + [(Path(b), bundle_manifest(b)) for b in extra_bundles]
    seen = set()
    for folder, bundle in found:
        if bundle is not None and folder.resolve() not in seen:
            seen.add(folder.resolve())
            archive = folder.with_name(folder.name + ".tar.gz")
            bundle["_folder"], bundle["_archive"] = str(folder), str(archive) if archive.is_file() else None
            view.bundles.append(bundle)
    return view


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- HTML pieces


def esc(value: Any) -> str:
    return html.escape(str(value))


def pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table whose cells are already HTML; wide tables scroll sideways on a phone."""
    header = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    head = f"<thead><tr>{header}</tr></thead>" if any(head) else ""
    return f'<div class="scroll"><table class="{cls}">{head}<tbody>{body}</tbody></table></div>'


def badge(passed: bool | None, yes: str = "PASS", no: str = "FAIL") -> str:
    if passed is None:
        return '<span class="badge none">not checked</span>'
    return f'<span class="badge {"pass" if passed else "fail"}">{yes if passed else no}</span>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def mib(size: int | None) -> str:
    return "–" if size is None else f"{size / 2**20:.2f} MiB"
