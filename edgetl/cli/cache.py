"""``edgetl cache ls`` and ``edgetl cache clear``: the decoded-image cache (:mod:`edgetl.data.cache`)."""

from __future__ import annotations

import time
from typing import Any

import click

from edgetl.cli.commands import Listing, finish, main
from edgetl.cli.edge import cache_dir_option
from edgetl.errors import ExitCode


@main.group("cache")
def cache_group() -> None:
    """The decoded-image cache that finetune, qat, export and check share (one entry per split)."""


def _listing_text(root: str, found: list[dict[str, Any]]) -> str:
    lines = [f"{root}: {len(found)} entries, {sum(i['bytes'] for i in found) / 2**20:,.1f} MiB"]
    for item in found:
        age = time.strftime("%Y-%m-%d %H:%M", time.localtime(item["modified"]))
        what = (f"{item['images']:>7} x {item['side']}px {item['mode']:<5} {item['first']}"
                if item["state"] == "ok" else item["state"])  # fmt: skip
        if item.get("problem"):
            what += f": {item['problem']}"
        lines.append(f"  {item['entry']}  {item['bytes'] / 2**20:>9,.1f} MiB  {age}  {what}")
    return "\n".join(lines)


@cache_group.command("ls")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def cache_ls(as_json: bool) -> None:
    """List the cache's entries: size, age, images, side, split kind, first file; damaged ones say why
    (quick checks; `edgetl cache verify` also hashes every image)."""
    from edgetl.data.cache import cache_root, entries

    root = cache_root()
    found = entries(root)
    finish(as_json, Listing({"root": str(root), "entries": found}), _listing_text(str(root), found))


class Verified(Listing):
    """``cache verify``'s result: exit 6 while a damaged entry is left in the cache."""

    @property
    def exit_code(self) -> int:
        left = [e for e in self.payload["entries"] if e["state"] == "damaged" and not e.get("removed")]
        return int(ExitCode.VERIFY_FAILED) if left else int(ExitCode.OK)


@cache_group.command("verify")
@cache_dir_option
@click.option("--remove", is_flag=True, help="Remove the damaged entries (they are rebuilt when next needed).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def cache_verify(remove: bool, as_json: bool) -> None:
    """Check every entry: its metadata and the hash of every stored image. Exit 6 if a damaged entry is
    left (a run would rebuild it anyway: it is never used)."""
    from edgetl.data.cache import cache_root, clear, entries

    root = cache_root()
    found = entries(root, verify=True)
    damaged = {e["entry"] for e in found if e["state"] == "damaged"}
    if remove and damaged:
        gone = set(clear(root, only=damaged)["removed"])
        for item in found:
            item["removed"] = item["entry"] in gone
    text = _listing_text(str(root), found)
    text += f"\n{len(damaged)} damaged" + (f", {sum(bool(e.get('removed')) for e in found)} removed" if remove else "")
    finish(as_json, Verified({"root": str(root), "entries": found, "damaged": len(damaged)}), text)


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
