"""Images embedded in the page as data URIs: the run's charts and thumbnails of dataset images."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

THUMB_SIDE = 112  # pixels; shown at 96 CSS pixels, sharp enough on a phone


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def chart(path: Path, alt: str) -> str:
    """An ``<img>`` of a PNG chart of the run, or a note that it is missing."""
    if not path.is_file():
        return f'<p class="muted">{html.escape(path.name)} is not in the run.</p>'
    return f'<img class="chart" src="{data_uri(path.read_bytes(), "image/png")}" alt="{html.escape(alt)}">'


def thumbnail(path: Path) -> str | None:
    """A small JPEG of an image file as a data URI; None when the file is gone or unreadable."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((THUMB_SIDE, THUMB_SIDE))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=82)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return data_uri(out.getvalue(), "image/jpeg")


def tile(root: Path | None, image: str, caption: str) -> str:
    """A gallery tile: the thumbnail (or the file name when the dataset is not at hand) and a caption."""
    uri = thumbnail(root / image) if root is not None else None
    picture = (f'<img src="{uri}" alt="{html.escape(image)}" width="96" height="96">' if uri
               else '<div class="missing">not found</div>')  # fmt: skip
    return (f'<figure class="tile">{picture}<figcaption>{caption}'
            f'<span class="file">{html.escape(image)}</span></figcaption></figure>')  # fmt: skip
