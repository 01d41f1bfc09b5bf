"""Twenty-two procedural image classification tasks.

Each task draws a 32×32 image of a class in a domain ("pretrain" or "task")
from a seeded generator, and describes its classes in two ways: caption words
used for contrastive pre-training, and prompt phrases (worded differently) used
for the zero-shot heads. Eight tasks form `ta8-mini`; the rest are extra
candidates, some related to the target tasks (font digits ~ digits, dice ~
counts, sides ~ shapes), some not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from evaluation.zoo import render as R

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]  # class phrases (words from the shared vocabulary)
    caption: str  # pre-training caption template, {c} = class phrase
    prompt: str  # zero-shot prompt template, worded unlike the captions
    draw: Callable[[np.random.Generator, int, str], np.ndarray]

    def render(self, rng: np.random.Generator, label: int, domain: str) -> np.ndarray:
        return self.draw(rng, label, domain)


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target


def draw_digits(rng, label, domain):
    images, targets = _sklearn_digits()
    # pre-training and task images come from disjoint halves of the bundled set
    pool = np.flatnonzero(targets == label)
    pool = pool[: len(pool) // 2] if domain == "pretrain" else pool[len(pool) // 2:]
    glyph = images[pool[rng.integers(len(pool))]]
    scale = 3
    big = np.kron(glyph, np.ones((scale, scale), dtype=np.float32))  # 24×24
    img, _ = R.canvas(rng, domain)
    arr = np.asarray(img, dtype=np.float32).copy()
    colour = np.array(R.random_colour(rng, domain), dtype=np.float32)
    x, y = rng.integers(0, R.SIZE - 24 + 1, size=2)
    patch = arr[y:y + 24, x:x + 24]
    arr[y:y + 24, x:x + 24] = patch * (1 - big[..., None]) + colour * big[..., None]
    return R.finish(R.Image.fromarray(arr.astype(np.uint8)), rng, domain)


def text_task(symbols: list[str], size: int = 22):
    def draw(rng, label, domain):
        img, d = R.canvas(rng, domain)
        R.glyph(d, symbols[label], rng, domain, R.random_colour(rng, domain), size)
        return R.finish(img, rng, domain)

    return draw


SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon"]


def draw_shape(d, kind, cx, cy, r, colour, rot, width=3):
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
    elif kind == "square":
        d.polygon(R.polygon(cx, cy, r * 1.3, 4, rot + math.pi / 4), fill=colour)
    elif kind == "diamond":
        d.polygon([(cx, cy - r * 1.2), (cx + r * 0.7, cy), (cx, cy + r * 1.2), (cx - r * 0.7, cy)], fill=colour)
    elif kind == "triangle":
        d.polygon(R.polygon(cx, cy, r * 1.2, 3, rot - math.pi / 2), fill=colour)
    elif kind == "star":
        d.polygon(R.star(cx, cy, r * 1.3, rot - math.pi / 2), fill=colour)
    elif kind == "cross":
        t = max(2, r // 2.5)
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    elif kind == "hexagon":
        d.polygon(R.polygon(cx, cy, r * 1.15, 6, rot), fill=colour)


def draw_shapes(rng, label, domain):
    img, d = R.canvas(rng, domain)
    r = rng.uniform(7, 11)
    cx, cy = rng.uniform(r + 2, R.SIZE - r - 2, size=2)
    draw_shape(d, SHAPES[label], cx, cy, r, R.random_colour(rng, domain), rng.uniform(-0.2, 0.2))
    return R.finish(img, rng, domain)


COLOUR_NAMES = list(R.COLOURS)


def draw_colours(rng, label, domain):
    img, d = R.canvas(rng, domain)
    r = rng.uniform(7, 12)
    cx, cy = rng.uniform(r, R.SIZE - r, size=2)
    kind = ["circle", "square", "triangle", "diamond"][rng.integers(4)]
    draw_shape(d, kind, cx, cy, r, R.jitter_colour(R.COLOURS[COLOUR_NAMES[label]], rng, domain), 0.0)
    return R.finish(img, rng, domain)


TEXTURES = ["horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots", "grid", "speckles",
            "waves"]


def draw_textures(rng, label, domain):
    yy, xx = np.mgrid[0:R.SIZE, 0:R.SIZE].astype(np.float32)
    period = rng.uniform(5, 8)
    phase = rng.uniform(0, period)
    kind = TEXTURES[label]
    if kind == "horizontal stripes":
        m = ((yy + phase) % period) < period / 2
    elif kind == "vertical stripes":
        m = ((xx + phase) % period) < period / 2
    elif kind == "diagonal stripes":
        m = ((xx + yy + phase) % period) < period / 2
    elif kind == "checkerboard":
        m = (((xx + phase) // (period / 2)) + ((yy + phase) // (period / 2))) % 2 == 0
    elif kind == "dots":
        m = (((xx + phase) % period - period / 2) ** 2 + ((yy + phase) % period - period / 2) ** 2) < (period / 3.5) ** 2
    elif kind == "grid":
        m = (((xx + phase) % period) < 1.5) | (((yy + phase) % period) < 1.5)
    elif kind == "speckles":
        m = rng.random((R.SIZE, R.SIZE)) < 0.3
    else:
        m = ((yy + 3 * np.sin((xx + phase) / 3)) % period) < period / 2
    bg = np.array(R.background(rng, domain), dtype=np.float32)
    fg = np.array(R.random_colour(rng, domain), dtype=np.float32)
    arr = np.where(m[..., None], fg, bg)
    return R.finish(R.Image.fromarray(arr.astype(np.uint8)), rng, domain)


def draw_counts(rng, label, domain):
    img, d = R.canvas(rng, domain)
    n = label + 1
    colour = R.random_colour(rng, domain)
    placed = []
    for _ in range(200):
        if len(placed) == n:
            break
        x, y = rng.uniform(4, R.SIZE - 4, size=2)
        if all((x - px) ** 2 + (y - py) ** 2 > 49 for px, py in placed):
            placed.append((x, y))
    for x, y in placed:
        d.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
    return R.finish(img, rng, domain)


ORIENTATIONS = ["horizontal", "vertical", "rising", "falling"]


def draw_orientation(rng, label, domain):
    img, d = R.canvas(rng, domain)
    angle = [0.0, 90.0, -45.0, 45.0][label] + rng.uniform(-10, 10)
    a = math.radians(angle)
    cx, cy = rng.uniform(12, 20, size=2)
    length = rng.uniform(9, 13)
    dx, dy = length * math.cos(a), length * math.sin(a)
    d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=R.random_colour(rng, domain), width=3)
    return R.finish(img, rng, domain)


POSITIONS = ["top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom", "bottom right"]


def draw_position(rng, label, domain):
    img, d = R.canvas(rng, domain)
    row, col = divmod(label, 3)
    cx = col * R.SIZE / 3 + R.SIZE / 6 + rng.uniform(-2, 2)
    cy = row * R.SIZE / 3 + R.SIZE / 6 + rng.uniform(-2, 2)
    r = rng.uniform(3, 4.5)
    draw_shape(d, ["circle", "square", "diamond"][rng.integers(3)], cx, cy, r, R.random_colour(rng, domain), 0.0)
    return R.finish(img, rng, domain)


SIZES = ["tiny", "small", "medium", "large", "huge"]


def draw_size(rng, label, domain):
    img, d = R.canvas(rng, domain)
    r = [2.5, 4.5, 7.0, 10.0, 13.5][label] * rng.uniform(0.9, 1.1)
    cx, cy = rng.uniform(min(r + 1, 16), max(R.SIZE - r - 1, 16), size=2)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=R.random_colour(rng, domain))
    return R.finish(img, rng, domain)


ARROWS = ["up", "down", "left", "right"]


def draw_arrows(rng, label, domain):
    img, d = R.canvas(rng, domain)
    colour = R.random_colour(rng, domain)
    cx, cy = rng.uniform(12, 20, size=2)
    base = {"up": -math.pi / 2, "down": math.pi / 2, "left": math.pi, "right": 0.0}[ARROWS[label]]
    a = base + rng.uniform(-0.15, 0.15)
    tip = (cx + 10 * math.cos(a), cy + 10 * math.sin(a))
    tail = (cx - 9 * math.cos(a), cy - 9 * math.sin(a))
    d.line([tail, tip], fill=colour, width=3)
    left = (tip[0] - 7 * math.cos(a - 0.5), tip[1] - 7 * math.sin(a - 0.5))
    right = (tip[0] - 7 * math.cos(a + 0.5), tip[1] - 7 * math.sin(a + 0.5))
    d.polygon([tip, left, right], fill=colour)
    return R.finish(img, rng, domain)


def draw_lines(rng, label, domain):
    img, d = R.canvas(rng, domain)
    n = label + 1
    colour = R.random_colour(rng, domain)
    gap = R.SIZE / (n + 1)
    vertical = rng.random() < 0.5
    for k in range(n):
        p = gap * (k + 1) + rng.uniform(-1, 1)
        if vertical:
            d.line([p, 4, p, R.SIZE - 4], fill=colour, width=2)
        else:
            d.line([4, p, R.SIZE - 4, p], fill=colour, width=2)
    return R.finish(img, rng, domain)


BRIGHTNESS = ["very dark", "dark", "dim", "bright", "very bright"]


def draw_brightness(rng, label, domain):
    level = [25, 75, 125, 175, 225][label] + rng.uniform(-12, 12)
    tint = rng.uniform(-15, 15, size=3)
    arr = np.full((R.SIZE, R.SIZE, 3), level, dtype=np.float32) + tint
    arr += rng.normal(0, 6, arr.shape)
    return R.finish(R.Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), rng, domain)


BACKGROUNDS = ["red", "green", "blue", "yellow", "cyan", "magenta"]


def draw_background(rng, label, domain):
    img, d = R.canvas(rng, domain, R.jitter_colour(R.COLOURS[BACKGROUNDS[label]], rng, domain))
    r = rng.uniform(4, 8)
    cx, cy = rng.uniform(r, R.SIZE - r, size=2)
    grey = int(rng.integers(200, 256))
    draw_shape(d, ["circle", "square", "triangle"][rng.integers(3)], cx, cy, r, (grey, grey, grey), 0.0)
    return R.finish(img, rng, domain)


def draw_sides(rng, label, domain):
    img, d = R.canvas(rng, domain)
    sides = label + 3
    r = rng.uniform(9, 13)
    d.polygon(R.polygon(16 + rng.uniform(-2, 2), 16 + rng.uniform(-2, 2), r, sides, rng.uniform(0, 2 * math.pi)),
              fill=R.random_colour(rng, domain))
    return R.finish(img, rng, domain)


DICE = {1: [(0, 0)], 2: [(-1, -1), (1, 1)], 3: [(-1, -1), (0, 0), (1, 1)], 4: [(-1, -1), (1, -1), (-1, 1), (1, 1)],
        5: [(-1, -1), (1, -1), (0, 0), (-1, 1), (1, 1)], 6: [(-1, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (1, 1)]}


def draw_dice(rng, label, domain):
    img, d = R.canvas(rng, domain)
    cx, cy = rng.uniform(14, 18, size=2)
    s = rng.uniform(12, 14)
    d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=(235, 235, 225))
    colour = R.random_colour(rng, domain)
    for px, py in DICE[label + 1]:
        x, y = cx + px * s * 0.55, cy + py * s * 0.55
        d.ellipse([x - 2.6, y - 2.6, x + 2.6, y + 2.6], fill=colour)
    return R.finish(img, rng, domain)


FREQUENCIES = ["one band", "two bands", "three bands", "four bands", "five bands"]


def draw_frequency(rng, label, domain):
    xx = np.arange(R.SIZE, dtype=np.float32)
    bands = label + 1
    wave = 0.5 + 0.5 * np.cos(2 * np.pi * bands * xx / R.SIZE + rng.uniform(0, 2 * np.pi))
    img = np.repeat(wave[None, :], R.SIZE, 0)
    if rng.random() < 0.5:
        img = img.T
    fg = np.array(R.random_colour(rng, domain), dtype=np.float32)
    bg = np.array(R.background(rng, domain), dtype=np.float32)
    arr = bg + (fg - bg) * img[..., None]
    return R.finish(R.Image.fromarray(arr.astype(np.uint8)), rng, domain)


GRADIENTS = ["light to the right", "light to the left", "light at the bottom", "light at the top"]


def draw_gradient(rng, label, domain):
    ramp = np.linspace(0, 1, R.SIZE, dtype=np.float32)
    g = [ramp[None, :], ramp[::-1][None, :], ramp[:, None], ramp[::-1][:, None]][label]
    g = np.broadcast_to(g, (R.SIZE, R.SIZE))
    colour = np.array(R.random_colour(rng, domain), dtype=np.float32)
    arr = 20 + g[..., None] * (colour - 20)
    return R.finish(R.Image.fromarray(arr.astype(np.uint8)), rng, domain)


FRAMES = ["no frame", "thin frame", "thick frame", "double frame"]


def draw_frame(rng, label, domain):
    img, d = R.canvas(rng, domain)
    colour = R.random_colour(rng, domain)
    m = int(rng.integers(1, 4))
    box = [m, m, R.SIZE - 1 - m, R.SIZE - 1 - m]
    if label == 1:
        d.rectangle(box, outline=colour, width=1)
    elif label == 2:
        d.rectangle(box, outline=colour, width=4)
    elif label == 3:
        d.rectangle(box, outline=colour, width=1)
        d.rectangle([b + (4 if i < 2 else -4) for i, b in enumerate(box)], outline=colour, width=1)
    d.ellipse([13, 13, 19, 19], fill=R.random_colour(rng, domain))
    return R.finish(img, rng, domain)


HALVES = ["left half", "right half", "top half", "bottom half"]


def draw_halves(rng, label, domain):
    img, d = R.canvas(rng, domain)
    c = int(R.SIZE / 2 + rng.integers(-2, 3))
    box = [[0, 0, c, R.SIZE], [c, 0, R.SIZE, R.SIZE], [0, 0, R.SIZE, c], [0, c, R.SIZE, R.SIZE]][label]
    d.rectangle(box, fill=R.random_colour(rng, domain))
    return R.finish(img, rng, domain)


FILLS = ["filled circle", "hollow circle", "filled square", "hollow square"]


def draw_fill(rng, label, domain):
    img, d = R.canvas(rng, domain)
    r = rng.uniform(7, 11)
    cx, cy = rng.uniform(r + 2, R.SIZE - r - 2, size=2)
    colour = R.random_colour(rng, domain)
    box = [cx - r, cy - r, cx + r, cy + r]
    if label == 0:
        d.ellipse(box, fill=colour)
    elif label == 1:
        d.ellipse(box, outline=colour, width=2)
    elif label == 2:
        d.rectangle(box, fill=colour)
    else:
        d.rectangle(box, outline=colour, width=2)
    return R.finish(img, rng, domain)


LETTERS = list("ABCDEFGHIJ")

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("digits", tuple(NUMBER_WORDS), "a handwritten {c}", "digit {c}", draw_digits),
    Task("letters", tuple(f"letter {c.lower()}" for c in LETTERS), "the capital {c}", "{c}", text_task(LETTERS)),
    Task("shapes", tuple(SHAPES), "a {c} shape", "{c}", draw_shapes),
    Task("colours", tuple(COLOUR_NAMES), "a {c} object", "{c} colour", draw_colours),
    Task("textures", tuple(TEXTURES), "a pattern of {c}", "{c} texture", draw_textures),
    Task("counts", tuple(NUMBER_WORDS[1:7]), "{c} dots", "count {c}", draw_counts),
    Task("position", tuple(POSITIONS), "a blob at the {c}", "{c} place", draw_position),
    Task("arrows", tuple(ARROWS), "an arrow pointing {c}", "{c} arrow", draw_arrows),
    Task("font_digits", tuple(NUMBER_WORDS), "the printed number {c}", "number {c}", text_task([str(i) for i in range(10)])),
    Task("lowercase", tuple(f"letter {c.lower()}" for c in LETTERS), "the small {c}", "lowercase {c}",
         text_task([c.lower() for c in LETTERS])),
    Task("orientation", tuple(ORIENTATIONS), "a {c} bar", "{c} line", draw_orientation),
    Task("size", tuple(SIZES), "a {c} disc", "{c} disc size", draw_size),
    Task("lines", tuple(NUMBER_WORDS[1:6]), "{c} parallel lines", "{c} lines", draw_lines),
    Task("brightness", tuple(BRIGHTNESS), "a {c} image", "{c} light", draw_brightness),
    Task("background", tuple(BACKGROUNDS), "a white shape on {c}", "{c} background", draw_background),
    Task("sides", tuple(NUMBER_WORDS[3:9]), "a polygon with {c} sides", "{c} sides", draw_sides),
    Task("dice", tuple(NUMBER_WORDS[1:7]), "a die showing {c}", "dice {c}", draw_dice),
    Task("frequency", tuple(FREQUENCIES), "a wave of {c}", "{c} wave", draw_frequency),
    Task("gradient", tuple(GRADIENTS), "a gradient {c}", "gradient {c}", draw_gradient),
    Task("frames", tuple(FRAMES), "a picture with {c}", "{c} border", draw_frame),
    Task("halves", tuple(HALVES), "the {c} painted", "{c} filled", draw_halves),
    Task("fills", tuple(FILLS), "a {c}", "{c} outline", draw_fill),
]}

TA8_MINI = ("digits", "letters", "colours", "textures", "counts", "position", "frequency", "frames")
