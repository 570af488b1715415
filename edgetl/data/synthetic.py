"""A deterministic, generated image dataset: the embedded default for the demo and the tests.

Each class is a shape (circle, square, triangle, cross, ring, ...). Colour, size, rotation, position,
background (flat or a gradient) and pixel noise vary per image, so a model has to learn the shape,
not a colour or a position: learnable, but not trivial.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
MARKER = "edgetl-synth.json"
CLASS_COLORS = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40), (200, 60, 220), (40, 210, 210))


def _polygon(cx: float, cy: float, radius: float, angle: float, corners: int, inner: float = 1.0):
    points = []
    for i in range(corners * (2 if inner != 1.0 else 1)):
        r = radius if (inner == 1.0 or i % 2 == 0) else radius * inner
        a = angle + math.pi * 2 * i / (corners * (2 if inner != 1.0 else 1))
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _cross(cx: float, cy: float, radius: float, angle: float):
    arm = radius * 0.35
    outline = [(-arm, -radius), (arm, -radius), (arm, -arm), (radius, -arm), (radius, arm),
               (arm, arm), (arm, radius), (-arm, radius), (-arm, arm), (-radius, arm),
               (-radius, -arm), (-arm, -arm)]  # fmt: skip
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in outline]


def render(
    shape: str, size: int, rng: np.random.Generator, color: tuple[int, int, int] | None = None
) -> np.ndarray:
    """One RGB uint8 image of ``shape`` with random scale, rotation, background and noise.

    The shape's colour is random unless ``color`` is given (then only jittered slightly).
    """
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:size, 0:size] / size
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if rng.random() < 0.5:
        c1 = c0  # a flat background half of the time
    direction = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(direction) + yy * math.sin(direction) + 1) / 2
    background = c0 * (1 - t[..., None]) + c1 * t[..., None]
    if color is not None:
        background = background * 0.35 + 80  # muted, so that the class colour stands out
        color = tuple(int(np.clip(v + rng.normal(0, 12), 0, 255)) for v in color)
    else:
        color = tuple(int(v) for v in rng.uniform(0, 255, 3))
        while np.abs(np.subtract(color, background.mean((0, 1)))).sum() < 120:  # keep it visible
            color = tuple(int(v) for v in rng.uniform(0, 255, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.18, 0.38)
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color)
    elif shape == "ring":
        width = max(2, int(radius * 0.3))
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=color, width=width)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, radius, angle, 4), fill=color)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius, angle, 3), fill=color)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, radius, angle), fill=color)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, radius, angle, 5, inner=0.45), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    pixels = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(2, 12), (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def generate(
    out: str | Path,
    classes: tuple[str, ...] = SHAPES[:5],
    per_class: int = 60,
    size: int = 96,
    seed: int = 0,
    test_per_class: int = 0,
    class_colors: bool = False,
) -> Path:
    """Write ``out/<class>/NNNN.png`` (and ``out/test/<class>/`` if asked); return ``out``.

    With ``class_colors`` each class also has its own colour (an easier task). The folder appears
    complete or not at all (built beside it, then renamed). An existing folder generated with the
    same parameters is reused as is.
    """
    out = Path(out)
    params = {"classes": list(classes), "per_class": per_class, "size": size, "seed": seed,
              "test_per_class": test_per_class, "class_colors": class_colors, "version": 1}  # fmt: skip
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for index, shape in enumerate(classes):
            rng = np.random.default_rng([seed, index])
            for split, count in (("", per_class), ("test", test_per_class)):
                if not count:
                    continue
                folder = tmp / split / shape
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    image = render(shape, size, rng, CLASS_COLORS[index % 6] if class_colors else None)
                    Image.fromarray(image).save(folder / f"{i:04d}.png")
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
