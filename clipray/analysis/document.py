"""One report, two renderings: Markdown (PNGs beside it) and a self-contained HTML page (PNGs
inlined as base64), from the same list of blocks, so the two never say different things."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """A heading, paragraph, bullet list, table or image of the report."""

    kind: str  # heading | text | bullets | table | image
    text: str = ""  # heading / paragraph text, an image's file name
    items: tuple[str, ...] = ()  # bullets, or a table's header
    rows: tuple[tuple[str, ...], ...] = ()  # a table's rows
    level: int = 2  # a heading's level
    caption: str = ""  # an image's alt text and caption


def heading(text: str, level: int = 2) -> Block:
    return Block("heading", text, level=level)


def text(paragraph: str) -> Block:
    return Block("text", paragraph)


def bullets(items: Sequence[str]) -> Block:
    return Block("bullets", items=tuple(items))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> Block:
    return Block("table", items=tuple(header), rows=tuple(tuple(r) for r in rows))


def image(name: str, caption: str) -> Block:
    return Block("image", name, caption=caption)


def interval(value: float, low: float, high: float, signed: bool = False) -> str:
    """A number with its interval, one decimal: ``12.3 [10.1, 14.0]`` (``+1.2 [...]`` signed);
    ``-`` for no value; no brackets for no interval."""
    if math.isnan(value):
        return "-"
    number = f"{value:+.1f}" if signed else f"{value:.1f}"
    return number if math.isnan(low) else f"{number} [{low:.1f}, {high:.1f}]"


def _md_cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown; images by their file name (written beside the .md)."""
    out: list[str] = []
    for b in blocks:
        if b.kind == "heading":
            out.append(f"{'#' * b.level} {b.text}")
        elif b.kind == "text":
            out.append(b.text)
        elif b.kind == "bullets":
            out.append("\n".join(f"- {item}" for item in b.items))
        elif b.kind == "table":
            lines = ["| " + " | ".join(map(_md_cell, b.items)) + " |"]
            lines.append("|" + "---|" * len(b.items))
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif b.kind == "image":
            out.append(f"![{b.caption}]({b.text})\n\n*{b.caption}*")
    return "\n\n".join(out) + "\n"


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;font-size:13px;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f3f3f3}"
    "img{max-width:100%}figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}"
)


def to_html(title: str, blocks: Sequence[Block], images: Mapping[str, bytes]) -> str:
    """One HTML file with nothing outside it: the PNGs inlined as data URIs."""
    e = html.escape
    body: list[str] = []
    for b in blocks:
        if b.kind == "heading":
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif b.kind == "text":
            body.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "bullets":
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b.items)
            rows = "".join(
                "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "image" and b.text in images:
            data = base64.b64encode(images[b.text]).decode("ascii")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{e(b.caption)}">'
                f"<figcaption>{e(b.caption)}</figcaption></figure>"
            )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
