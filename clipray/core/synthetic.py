"""The built-in synthetic dataset: captioned shapes, generated from a seed.

Each image holds ``min_shapes..max_shapes`` shapes of varied kind, colour, size and grid position
on a varied background. Its ``layout`` captions (the default) state what every corruption keeps:
each shape's kind, size and grid cell, and how many there are; colours vary but are never named,
and each shape contrasts with its background, so a corrupted image still shows what its caption
says and a corruption is a nuisance, not a changed fact. ``counts`` captions say how many shapes
of each size and kind there are and leave places out. ``colour`` captions also name the shape
and background colours (which brightness, contrast, fog and frost change). Few layout captions
are shared between images, so retrieval is a real task (counts captions: about a quarter of the
test images share their facts with another). ``grain`` adds photo-like sensor noise and
``shading`` uneven light (a smooth field on every channel, so shapes keep their contrast). Image
``i`` of a split depends only on ``(data_seed, split, i)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from clipray.config.schema import SyntheticData

SPLITS = ("train", "val", "test")


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {"gray": (128, 128, 128), "dark": (45, 45, 60), "light": (225, 215, 190)}
SIZES = {"small": 0.11, "large": 0.17}  # radius as a fraction of the image side; fits a grid cell
POSITIONS = [  # 3x3 grid, row-major
    "in the top left",
    "at the top",
    "in the top right",
    "on the left",
    "in the center",
    "on the right",
    "in the bottom left",
    "at the bottom",
    "in the bottom right",
]


def _polygon(k: int, cx: float, cy: float, r: float, phase: float = -np.pi / 2) -> list:
    a = phase + 2 * np.pi * np.arange(k) / k
    return list(zip(cx + r * np.cos(a), cy + r * np.sin(a), strict=True))


def _star(cx: float, cy: float, r: float) -> list:
    outer, inner = _polygon(5, cx, cy, r), _polygon(5, cx, cy, r * 0.45, -np.pi / 2 + np.pi / 5)
    return [p for pair in zip(outer, inner, strict=True) for p in pair]


def _cross(cx: float, cy: float, r: float) -> list:
    t = r * 0.35
    pts = [
        (-t, -r),
        (t, -r),
        (t, -t),
        (r, -t),
        (r, t),
        (t, t),
        (t, r),
        (-t, r),
        (-t, t),
        (-r, t),
        (-r, -t),
        (-t, -t),
    ]
    return [(cx + x, cy + y) for x, y in pts]


SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, float, float, float, tuple], None]] = {
    "circle": lambda d, x, y, r, c: d.ellipse((x - r, y - r, x + r, y + r), fill=c),
    "square": lambda d, x, y, r, c: d.rectangle(
        (x - r * 0.85, y - r * 0.85, x + r * 0.85, y + r * 0.85), fill=c
    ),
    "triangle": lambda d, x, y, r, c: d.polygon(_polygon(3, x, y + r * 0.2, r * 1.1), fill=c),
    "diamond": lambda d, x, y, r, c: d.polygon(_polygon(4, x, y, r), fill=c),
    "star": lambda d, x, y, r, c: d.polygon(_star(x, y, r * 1.1), fill=c),
    "cross": lambda d, x, y, r, c: d.polygon(_cross(x, y, r), fill=c),
}


def _describe(shape: tuple[str, str, str, int], colour: bool) -> str:
    kind, hue, size, pos = shape
    return f"a {size} {hue + ' ' if colour else ''}{kind} {POSITIONS[pos]}"


COLOUR_TEMPLATES = [  # colour captions: shapes, then the background's colour
    lambda parts, bg: f"{_join(parts)} on a {bg} background",
    lambda parts, bg: f"a {bg} background with {_join(parts)}",
    lambda parts, bg: f"picture of {_join(parts)}, {bg} background",
    lambda parts, bg: f"on a {bg} background: {_join(parts)}",
    lambda parts, bg: f"{_join(parts)}; the background is {bg}",
]
NUMBERS = ["no", "one", "two", "three", "four"]
LAYOUT_TEMPLATES = [  # layout and counts captions: the count, said or implied, and each part
    lambda parts, n: _join(parts),
    lambda parts, n: f"{NUMBERS[n]} shape{'s' if n > 1 else ''}: {_join(parts)}",
    lambda parts, n: f"picture of {_join(parts)}",
    lambda parts, n: f"there {'are' if n > 1 else 'is'} {_join(parts)}",
    lambda parts, n: f"{_join(parts)}, {NUMBERS[n]} in all",
]


def _inventory(shapes: list) -> list[str]:
    """``counts`` captions: how many shapes of each size and kind, most frequent first."""
    tally = Counter((size, kind) for kind, _, size, _ in shapes)
    items = sorted(tally.items(), key=lambda item: (-item[1], item[0]))
    return [
        f"{NUMBERS[n]} {size} {_plural(kind)}" if n > 1 else f"a {size} {kind}"
        for (size, kind), n in items
    ]


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("s") else "s")


def _captions(shapes: list, background: str, cfg: SyntheticData, rng: np.random.Generator):
    """``captions_per_image`` distinct paraphrases of the same facts (part order and template
    vary)."""
    colour = cfg.captions == "colour"
    if cfg.captions == "counts":
        facts = _inventory(shapes)
    else:
        facts = [_describe(shape, colour) for shape in shapes]
    out = []
    for k in range(cfg.captions_per_image):
        # layout: always in reading order (row by row), as a person would list a grid
        shuffle = k and cfg.captions != "layout"
        parts = [facts[j] for j in (rng.permutation(len(facts)) if shuffle else range(len(facts)))]
        # a different template per caption keeps them distinct
        if colour:
            out.append(COLOUR_TEMPLATES[k](parts, background))
        else:
            out.append(LAYOUT_TEMPLATES[k](parts, len(shapes)))
    return out


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


MIN_CONTRAST = 70  # luma steps between a layout shape and its background: visible at contrast s5
LAYOUT_BACKGROUNDS = ("dark", "light")  # mid-gray leaves too few colours that contrast with it


def _palette(cfg: SyntheticData, background: str) -> list[str]:
    """The colours a shape may take on ``background``."""
    if cfg.captions == "colour":
        return list(COLOURS)
    bg = _luma(BACKGROUNDS[background])
    return [c for c, rgb in COLOURS.items() if abs(_luma(rgb) - bg) >= MIN_CONTRAST]


def synthetic_image(cfg: SyntheticData, split: str, index: int) -> tuple[np.ndarray, list[str]]:
    """Image ``index`` of ``split`` and its captions, from ``(data_seed, split, index)`` alone."""
    rng = np.random.default_rng([cfg.data_seed, SPLITS.index(split), index])
    s = cfg.image_size
    backgrounds = list(BACKGROUNDS) if cfg.captions == "colour" else LAYOUT_BACKGROUNDS
    background = backgrounds[rng.integers(len(backgrounds))]
    palette = _palette(cfg, background)
    if cfg.backgrounds == "varied":
        colours, fill = _varied_colours(rng)
    else:
        colours, fill = COLOURS, BACKGROUNDS[background]
    img = Image.new("RGB", (s, s), fill)
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    shapes = []
    for pos in sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist()):
        kind = list(SHAPES)[rng.integers(len(SHAPES))]
        colour = palette[rng.integers(len(palette))] if colours is COLOURS else list(colours)[pos]
        size = list(SIZES)[rng.integers(len(SIZES))]
        row, col = divmod(pos, 3)
        jitter = rng.uniform(-0.04, 0.04, size=2) * s
        cx, cy = (col + 0.5) * s / 3 + jitter[0], (row + 0.5) * s / 3 + jitter[1]
        SHAPES[kind](draw, cx, cy, SIZES[size] * s, colours[colour])
        shapes.append((kind, colour, size, pos))
    pixels = _shade(np.asarray(img), cfg.shading, [cfg.data_seed, SPLITS.index(split), index])
    return _grain(pixels, cfg.grain, rng), _captions(shapes, background, cfg, rng)


SHADING_GRID = 4  # control points per side of the lighting field: a few soft blobs per image


def _shade(pixels: np.ndarray, shading: float, key: list[int]) -> np.ndarray:
    """Uneven light (``shading`` > 0): a field smoothly interpolated (bicubic) from a 4x4 grid
    of uniform draws, scaled to peak at 1, times an amplitude drawn from ``[0, shading]`` levels,
    added to every channel. Drawn from its own stream (``key`` + [1]), so every other draw of the
    image is what it is without shading."""
    if not shading:
        return pixels
    rng = np.random.default_rng([*key, 1])
    grid = rng.uniform(-1.0, 1.0, size=(SHADING_GRID, SHADING_GRID)).astype(np.float32)
    h, w = pixels.shape[:2]
    field = np.array(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC))
    field *= rng.uniform(0.0, shading) / max(float(np.abs(field).max()), 1e-6)
    return np.clip(pixels + field[..., None], 0, 255).astype(np.uint8)


def _grain(pixels: np.ndarray, grain: float, rng: np.random.Generator) -> np.ndarray:
    """A mild uniform texture (``grain`` 0), or Gaussian grain of a per-image standard deviation
    drawn from ``[0, grain]`` levels."""
    if grain:
        noise = np.rint(rng.normal(0.0, rng.uniform(0.0, grain), size=pixels.shape))
    else:
        noise = rng.integers(-6, 7, size=pixels.shape)
    return np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _varied_colours(rng: np.random.Generator) -> tuple[dict, tuple[int, int, int]]:
    """``backgrounds: varied``: a random background and, per grid cell, a random shape colour at
    least ``MIN_CONTRAST`` luma steps from it (a dict keyed by cell, like ``COLOURS`` by name)."""
    fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
    out: dict[str, tuple[int, int, int]] = {}
    while len(out) < len(POSITIONS):
        rgb = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if abs(_luma(rgb) - _luma(fill)) >= MIN_CONTRAST:
            out[len(out)] = rgb
    return out, fill


def synthetic_split(cfg: SyntheticData, split: str) -> tuple[np.ndarray, list[list[str]]]:
    """All images of ``split`` (uint8 NxHxWx3) and their captions."""
    n = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}[split]
    items = [synthetic_image(cfg, split, i) for i in range(n)]
    return np.stack([im for im, _ in items]), [c for _, c in items]
