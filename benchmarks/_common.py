"""Helpers shared by the benchmark scripts: machine description and result writing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        # x86: "model name"; a Raspberry Pi's kernel names the board in "Model" instead
        for key in ("model name", "Model"):
            found = [line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key]
            if found:
                cpu = found[0]
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def write_result(name: str, result: dict, markdown: str) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md``, print the markdown and where it went;
    return the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown.rstrip("\n"))
    print(f"wrote {json_path}")
    return json_path


def finished_run(path: str) -> Path | None:
    """The fine-tuning run at ``path``, or None (saying so on stderr) when there is none to measure."""
    run = Path(path)
    if not (run / "model.pt").is_file():
        print(f"skipped: no finished run in {run}", file=sys.stderr)
        return None
    return run


def training_settings(run: Path) -> str:
    """How ``run`` was fine-tuned, for a result's header: the settings that differ from edgetl's
    defaults (weights left out: every run here starts from the shared ImageNet backbone unless it says
    ``weights=none``) and the kept model's validation top-1."""
    from edgetl.config import FinetuneConfig

    config = json.loads((run / "manifest.json").read_text())["stages"]["finetune"]["config"]
    defaults = FinetuneConfig().to_dict()
    changed = [
        f"{k}={v}"
        for k, v in config.items()
        if k in defaults and k not in ("weights", "device", "decode_workers") and v != defaults[k]
    ]
    if config.get("weights") == "none":
        changed.insert(0, "weights=none")
    metrics = json.loads((run / "metrics.json").read_text())
    how = "edgetl finetune defaults" if not changed else "edgetl finetune with " + ", ".join(changed)
    return f"{how}; kept model's val top-1 {100 * metrics['val']['top1']:.2f}% (epoch {metrics['best_epoch']})"
