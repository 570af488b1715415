"""An image's size from its header, before anything is decoded: a 400 KB PNG can declare 400 megapixels
(1.2 GB decoded, an OOM kill on a 1-2 GB board).

The device refuses what training refuses: more than :data:`MAX_PIXELS`, Pillow's decompression-bomb
limit (``2 * Image.MAX_IMAGE_PIXELS``), which :func:`edgetl.data.decode.decode_image` hits. PNG, JPEG,
BMP, GIF and WebP headers are read here; for any other format OpenCV's own check
(``OPENCV_IO_MAX_IMAGE_PIXELS``, set to the same limit by :func:`edgetl.runtime.preprocess.load_image`)
refuses it before it allocates.
"""

from __future__ import annotations

import struct

MAX_PIXELS = 2 * 89_478_485  # Pillow's DecompressionBombError threshold (PIL.Image.MAX_IMAGE_PIXELS x 2)

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` declared by the header of a PNG, JPEG, BMP, GIF or WebP file; None when the
    format is another one or the header is cut short."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:2] == b"BM":
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
    except struct.error:
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The frame header (SOFn) of a JPEG: walk the marker segments from the start."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            at += 2
            continue
        length = struct.unpack(">H", data[at + 2 : at + 4])[0]
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return width, height
        at += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def refuse_too_large(data: bytes, path: str) -> None:
    """Raise ValueError when the header declares more than :data:`MAX_PIXELS`.

    Raises:
        ValueError: the image is larger than training would decode.
    """
    size = header_size(data)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        width, height = size
        raise ValueError(f"{path} declares {width}x{height} pixels ({width * height / 1e6:,.0f} Mpx), more than the "
                         f"{MAX_PIXELS / 1e6:,.0f} Mpx training decodes: not decoded (a decompression bomb?)")
