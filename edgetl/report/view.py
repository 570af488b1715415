"""What the page shows, read from the run folder: each file optional, so a page can be written after
any stage (after finetune there is no parity yet)."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.errors import RunDirError, first_line
from edgetl.rundir import bundle_manifest, read_manifest, run_bundles, verify_files


@dataclass
class RunView:
    run_dir: Path
    manifest: dict[str, Any]
    metrics: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    benchmark: dict[str, Any] | None = None
    bundles: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what is missing or damaged, shown first
    file_states: dict[str, str] = field(default_factory=dict)  # manifest file -> "missing" / "differs"

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
    """What the run holds, and what of it is missing or damaged (``problems``: files the manifest lists
    that are gone or changed, a stage's JSON record that is missing or unreadable).

    Raises:
        RunDirError: a bundle in ``extra_bundles`` is not an edgetl bundle.
    """
    view = RunView(run_dir, read_manifest(run_dir))
    for rel in verify_files(run_dir, view.manifest):
        if not (run_dir / rel).is_file():
            view.file_states[rel] = "missing"
            entry = view.manifest["files"][rel]
            stage = entry.get("stage", "?") if isinstance(entry, dict) else "?"
            view.problems.append(f"{rel} is missing (the manifest lists it, stage {stage})")
        else:
            view.file_states[rel] = "differs"
            view.problems.append(f"{rel} differs from the manifest's sha256 (changed or damaged since it was written)")
    for name, stage, attr in (("metrics.json", "finetune", "metrics"), ("parity.json", "check", "parity"),
                              ("benchmark.json", "benchmark", "benchmark")):  # fmt: skip
        setattr(view, attr, _record(run_dir / name, stage in view.stages, view))
    for extra in extra_bundles:
        if bundle_manifest(extra) is None:
            raise RunDirError(f"--bundle {extra} is not an edgetl bundle (no readable manifest.json of one)")
    found = run_bundles(run_dir) + [(Path(b), bundle_manifest(b)) for b in extra_bundles]
    seen = set()
    for folder, bundle in found:
        if bundle is not None and folder.resolve() not in seen:
            seen.add(folder.resolve())
            archive = folder.with_name(folder.name + ".tar.gz")
            bundle["_folder"], bundle["_archive"] = str(folder), str(archive) if archive.is_file() else None
            view.bundles.append(bundle)
    return view


def _record(path: Path, expected: bool, view: RunView) -> dict[str, Any] | None:
    """A stage's JSON record; None (and a problem when the stage ran) if it is missing or unreadable."""
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        if expected and path.name not in view.file_states:
            view.problems.append(f"{path.name} is missing")
        return None
    except (OSError, ValueError, RecursionError) as exc:
        view.problems.append(f"{path.name} cannot be read: {first_line(exc)}")
        return None
    if not isinstance(found, dict):
        view.problems.append(f"{path.name} is damaged: it holds a {type(found).__name__}, not a JSON object")
        return None
    return found


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
