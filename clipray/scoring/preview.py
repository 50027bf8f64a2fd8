"""One evaluation image under every corruption and severity, drawn as one picture for the docs.

Pure image code (PIL, no Ray or MLflow). Rows are the corruptions grouped by ImageNet-C family
(the 4 extra ones last), columns the clean image and a few severities, the caption is the title,
so a reader can check the caption stays true under every corruption. Each cell is exactly what
the scorer's cache holds for that image: :func:`corrupt` seeded with
``derive_seed(eval.seed, index, name, severity)``, as ``corrupt_batch`` seeds image ``index``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipray.config.corruption_names import FAMILIES, check_severity, resolve_corruptions
from clipray.scoring.corruptions import corrupt, derive_seed

SEVERITIES = (1, 3, 5)  # mild, middle, worst: the default sweep's severities
CELL = 128  # target cell side in px: a 64 px image is shown x2, a 32 px one x4, 224 px as is
GAP = 4  # px between cells; wider gaps would make the grid taller without showing more
MARGIN = 10  # px around the whole picture
TEXT = 13  # px font size of labels and headers: readable next to a 128 px cell
TITLE = 15  # px font size of the caption
# PNG size: pixel values are rounded to multiples of STEP (off by <= 6 of 255, the synthetic
# images' own texture), which takes the 19 x 4 grid of 64 px images from about 730 KB to about
# 320 KB (8: 400 KB); a 256-colour palette is smaller but visibly bands fog and frost.
STEP = 12
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
FAINT = (110, 110, 110)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (Pillow >= 10.1), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow 10.0 has no size argument
        return ImageFont.load_default()


def families(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``names`` grouped by family, families in ImageNet-C order; a name in none goes last."""
    names = resolve_corruptions(names)
    groups = [(family, [n for n in members if n in names]) for family, members in FAMILIES.items()]
    known = {n for _, members in groups for n in members}
    groups.append(("other", [n for n in names if n not in known]))
    return [(family, members) for family, members in groups if members]


def corrupted_cells(
    image: np.ndarray, index: int, seed: int, names: Sequence[str], severities: Sequence[int]
) -> dict[tuple[str, int], np.ndarray]:
    """Image ``index`` of the eval set under each (corruption, severity), as the cache has it."""
    return {
        (name, s): corrupt(image, name, s, derive_seed(seed, index, name, s))
        for name in resolve_corruptions(names)
        for s in map(check_severity, severities)
    }


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` px (a longer single word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


@dataclass(frozen=True)
class Layout:
    """Where everything goes: a label column, then one column per image; a title, a header
    row, then per family a name strip and one row per corruption."""

    side: int  # the images' side in px
    scale: int  # nearest-neighbour upscaling factor
    columns: int  # clean + severities
    label_width: int  # px
    title_lines: tuple[str, ...]
    line: int = TITLE + 6  # px per title line
    strip: int = TEXT + 9  # px of a header row or a family name strip

    @property
    def cell(self) -> int:
        return self.side * self.scale

    @property
    def width(self) -> int:
        return 2 * MARGIN + self.label_width + self.columns * (self.cell + GAP)

    @property
    def top(self) -> int:
        """y of the header row (below the title)."""
        return MARGIN + len(self.title_lines) * self.line + GAP

    def height(self, families: int, rows: int) -> int:
        return self.top + self.strip + families * self.strip + rows * (self.cell + GAP) + MARGIN

    def x(self, column: int) -> int:
        return MARGIN + self.label_width + GAP + column * (self.cell + GAP)

    def y(self, family: int, row: int) -> int:
        """y of the ``row``-th corruption (counted over all families) in the ``family``-th."""
        return self.top + (2 + family) * self.strip + row * (self.cell + GAP)


def layout(side: int, columns: int, caption: str, names: Sequence[str]) -> Layout:
    """The geometry of a preview of ``side`` px images with these columns, caption and rows."""
    scale = max(1, CELL // side)
    label_width = int(max(_font(TEXT).getlength(n) for n in names)) + 2 * GAP
    width = 2 * MARGIN + label_width + columns * (side * scale + GAP)
    lines = tuple(_wrap(caption, _font(TITLE), width - 2 * MARGIN))
    return Layout(side, scale, columns, label_width, lines)


def compose(
    image: np.ndarray,
    cells: dict[tuple[str, int], np.ndarray],
    caption: str,
    severities: Sequence[int] = SEVERITIES,
) -> Image.Image:
    """The grid: per corruption a row with the clean image and ``cells[name, s]`` for each s."""
    names = list(dict.fromkeys(name for name, _ in cells))
    groups = families(names)
    geo = layout(image.shape[0], 1 + len(severities), caption, names)
    out = Image.new("RGB", (geo.width, geo.height(len(groups), len(names))), BACKGROUND)
    draw = ImageDraw.Draw(out)
    text, title = _font(TEXT), _font(TITLE)
    for i, line in enumerate(geo.title_lines):
        draw.text((MARGIN, MARGIN + i * geo.line), line, fill=INK, font=title)
    heads = ["clean", *(f"severity {s}" for s in severities)]
    for column, head in enumerate(heads):
        draw.text((geo.x(column), geo.top + 2), head, fill=INK, font=text)
    row = 0
    for f, (family, members) in enumerate(groups):
        draw.text((MARGIN, geo.y(f, row) - geo.strip + 4), family, fill=FAINT, font=text)
        for name in members:
            y = geo.y(f, row)
            draw.text((MARGIN, y + geo.cell // 2 - TEXT // 2), name, fill=INK, font=text)
            images = [image, *(cells[name, s] for s in severities)]
            for column, pixels in enumerate(images):
                out.paste(_upscale(pixels, geo.scale), (geo.x(column), y))
            row += 1
    return out


def _upscale(pixels: np.ndarray, scale: int) -> Image.Image:
    """``pixels`` ``scale`` times larger, each pixel a ``scale`` x ``scale`` block."""
    return Image.fromarray(pixels.repeat(scale, axis=0).repeat(scale, axis=1))


def preview_png(
    image: np.ndarray,
    caption: str,
    index: int,
    seed: int,
    names: Sequence[str] = ("all",),
    severities: Sequence[int] = SEVERITIES,
) -> bytes:
    """The preview of image ``index`` of the eval set as PNG bytes (written by the caller)."""
    cells = corrupted_cells(image, index, seed, names, severities)
    picture = np.asarray(compose(image, cells, caption, severities), dtype=np.int16)
    rounded = np.clip((picture + STEP // 2) // STEP * STEP, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rounded).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
