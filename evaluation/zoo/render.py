"""Drawing primitives for the procedural tasks (numpy + PIL, 32×32 RGB).

Two domains make zero-shot transfer partial on purpose: `pretrain` images use
one set of fonts and colours, `task` images use other fonts, shifted colours
and sensor-like noise, as TA8's downstream datasets differ from CLIP's web
pre-training data.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 32
FONT_FILES = {
    "pretrain": ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf"],
    "task": ["DejaVuSansMono.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans-Oblique.ttf"],
}
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
    "cyan": (40, 200, 210), "magenta": (210, 50, 200), "orange": (240, 140, 30), "purple": (120, 50, 170),
}


@lru_cache(maxsize=None)
def font(file: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / file), size)


def fonts(domain: str) -> list[str]:
    return FONT_FILES[domain]


def jitter_colour(rgb, rng: np.random.Generator, domain: str) -> tuple[int, int, int]:
    spread = 25 if domain == "pretrain" else 45  # the task domain's palette drifts further
    shift = 0 if domain == "pretrain" else 18
    return tuple(int(np.clip(c + shift * (1 if i == 2 else -1) + rng.integers(-spread, spread + 1), 0, 255))
                 for i, c in enumerate(rgb))


def random_colour(rng: np.random.Generator, domain: str, exclude: str | None = None) -> tuple[int, int, int]:
    names = [n for n in COLOURS if n != exclude]
    return jitter_colour(COLOURS[names[rng.integers(len(names))]], rng, domain)


def background(rng: np.random.Generator, domain: str) -> tuple[int, int, int]:
    level = int(rng.integers(0, 50)) if domain == "pretrain" else int(rng.integers(20, 90))
    tint = rng.integers(-10, 11, size=3)
    return tuple(int(np.clip(level + t, 0, 255)) for t in tint)


def canvas(rng: np.random.Generator, domain: str, colour=None) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (SIZE, SIZE), colour or background(rng, domain))
    return img, ImageDraw.Draw(img)


def finish(img: Image.Image, rng: np.random.Generator, domain: str) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32)
    if domain == "task":
        arr = arr + rng.normal(0, 14, arr.shape)  # sensor noise the pre-training never saw
    return np.clip(arr, 0, 255).astype(np.uint8)


def glyph(draw: ImageDraw.ImageDraw, text: str, rng: np.random.Generator, domain: str, colour, size: int = 22) -> None:
    f = font(fonts(domain)[rng.integers(len(fonts(domain)))], size + int(rng.integers(-3, 4)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    w, h = right - left, bottom - top
    x = (SIZE - w) / 2 - left + rng.integers(-3, 4)
    y = (SIZE - h) / 2 - top + rng.integers(-3, 4)
    draw.text((x, y), text, fill=colour, font=f)


def polygon(cx: float, cy: float, r: float, sides: int, rotation: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rotation + 2 * math.pi * k / sides), cy + r * math.sin(rotation + 2 * math.pi * k / sides))
            for k in range(sides)]


def star(cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rr = r if k % 2 == 0 else r * 0.45
        a = rotation + math.pi * k / 5
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts
