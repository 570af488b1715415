"""``edgetl cache ls`` and ``edgetl cache clear``: the decoded-image cache (:mod:`edgetl.data.cache`)."""

from __future__ import annotations

import time
from typing import Any

import click

from edgetl.cli.commands import Listing, finish, main
from edgetl.cli.edge import cache_dir_option


@main.group("cache")
def cache_group() -> None:
    """The decoded-image cache that finetune, qat, export and check share (one entry per split)."""


def _listing_text(root: str, found: list[dict[str, Any]]) -> str:
    lines = [f"{root}: {len(found)} entries, {sum(i['bytes'] for i in found) / 2**20:,.1f} MiB"]
    for item in found:
        age = time.strftime("%Y-%m-%d %H:%M", time.localtime(item["modified"]))
        what = (f"{item['images']:>7} x {item['side']}px {item['mode']:<5} {item['first']}"
                if item["state"] == "ok" else item["state"])  # fmt: skip
        lines.append(f"  {item['entry']}  {item['bytes'] / 2**20:>9,.1f} MiB  {age}  {what}")
    return "\n".join(lines)


@cache_group.command("ls")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def cache_ls(as_json: bool) -> None:
    """List the cache's entries: size, age, images, side, split kind, first file."""
    from edgetl.data.cache import cache_root, entries

    root = cache_root()
    found = entries(root)
    finish(as_json, Listing({"root": str(root), "entries": found}), _listing_text(str(root), found))


@cache_group.command("clear")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def cache_clear(as_json: bool) -> None:
    """Remove every entry (an entry being built right now is left alone). Runs decode again next time."""
    from edgetl.data.cache import clear

    done = clear()
    text = f"removed {len(done['removed'])} entries ({done['bytes_freed'] / 2**20:,.1f} MiB) from {done['root']}"
    if done["busy"]:
        text += f"; {len(done['busy'])} being built were left"
    finish(as_json, Listing(done), text)
