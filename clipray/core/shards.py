"""WebDataset tar shards (img2dataset's layout): listing, reading, decoding and writing.

A shard is a tar whose members are grouped by key: ``<key>.jpg`` (any extension PIL reads) with
``<key>.txt`` (the caption) and/or ``<key>.json`` (a caption field). Shard lists are brace
patterns (``train/{00000..00311}.tar``), local paths or ``s3://`` / ``gs://`` URIs (opened with
the filesystems pyarrow brings). Reading streams: one member at a time, never a whole shard.

A sample that cannot be used (an image PIL cannot decode, no caption) is not an error: readers
yield it as ``None`` so callers count it (the run stops only past ``data.max_skip_fraction``).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from clipray.core.tarstream import tar_members

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
REMOTE = ("s3://", "gs://", "gcs://")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` -> ``a/000.tar, a/001.tar, a/002.tar`` (zero padding kept; several
    ranges expand as a product, left to right)."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise ValueError(f"shard pattern {pattern!r}: empty range {{{lo}..{hi}}}")
    width = len(lo) if lo.startswith("0") else 0
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [
        head + str(i).zfill(width) + rest
        for i in range(int(lo), int(hi) + 1)
        for rest in expand_braces(tail)
    ]


def shard_list(patterns: str | list[str]) -> list[str]:
    """Every shard of ``patterns`` (one pattern or a list), in order, duplicates kept once."""
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    out = [s for p in items for s in expand_braces(p)]
    return list(dict.fromkeys(out))


def is_remote(shard: str) -> bool:
    return shard.startswith(REMOTE)


def open_shard(shard: str) -> IO[bytes]:
    """A readable binary stream of ``shard``: a local file, or an object in a bucket."""
    if not is_remote(shard):
        return open(shard, "rb")  # noqa: SIM115 - the caller closes it
    from pyarrow import fs  # only remote shards need it

    filesystem, path = fs.FileSystem.from_uri(shard)
    return filesystem.open_input_stream(path)


@dataclass
class Member:
    """One encoded image kept in memory (an eval split read from shards); ``name`` says where."""

    name: str
    data: bytes

    def __str__(self) -> str:
        return self.name


Raw = dict[str, bytes]  # extension -> bytes of one sample


def iter_raw(shard: str) -> Iterator[tuple[str, Raw]]:
    """The samples of one shard as (key, {extension: bytes}), streamed in tar order."""
    with open_shard(shard) as f:
        key, group = None, {}
        for path, data in tar_members(f):
            name = path.rsplit("/", 1)[-1]
            stem, _, ext = name.partition(".")
            if not ext or stem.startswith("_"):
                continue  # img2dataset's _stats.json and the like
            if stem != key and group:
                yield f"{shard}:{key}", group
                group = {}
            key = stem
            group[ext.lower()] = data
        if group:
            yield f"{shard}:{key}", group


def caption_of(raw: Raw, field: str | None) -> str | None:
    """The caption: ``.txt``, or ``field`` of ``.json`` when given. None when missing/empty."""
    try:
        if field is not None:
            text = json.loads(raw["json"].decode("utf-8")).get(field)
        else:
            text = raw["txt"].decode("utf-8")
    except (KeyError, ValueError, AttributeError):
        return None
    return text.strip() if isinstance(text, str) and text.strip() else None


def image_bytes(raw: Raw) -> bytes | None:
    return next((raw[e] for e in IMAGE_EXTENSIONS if e in raw), None)


def read_members(
    patterns: str | list[str], field: str | None
) -> tuple[list[Member], list[list[str]]]:
    """A small shard set (an eval split) into memory, encoded: (images, captions per image).
    A ``.json`` ``captions`` list (what ``write_shards`` adds) gives every caption of an image."""
    images, captions = [], []
    for shard in shard_list(patterns):
        for key, raw in guarded(shard, iter_raw(shard)):
            caption, data = caption_of(raw, field), image_bytes(raw)
            if caption is None or data is None:
                raise ValueError(f"{key}: a sample without {'a caption' if data else 'an image'}")
            images.append(Member(key, data))
            captions.append(_all_captions(raw) or [caption])
    return images, captions


def _all_captions(raw: Raw) -> list[str] | None:
    try:
        listed = json.loads(raw["json"].decode("utf-8")).get("captions")
    except (KeyError, ValueError, AttributeError):
        return None
    ok = (
        isinstance(listed, list)
        and listed
        and all(isinstance(c, str) and c.strip() for c in listed)
    )
    return [c.strip() for c in listed] if ok else None


def guarded(shard: str, samples: Iterator[tuple[str, Raw]]) -> Iterator[tuple[str, Raw]]:
    """``samples`` of ``shard``; a shard that is missing, unreadable or not a tar raises one
    ValueError naming it."""
    try:
        yield from samples
    except FileNotFoundError:
        raise ValueError(f"shard not found: {shard}") from None
    except tarfile.TarError as e:
        raise ValueError(f"{shard}: not a readable tar ({e})") from None
    except OSError as e:
        raise ValueError(f"{shard}: cannot be read ({e.strerror or e})") from None


def write_shards(
    samples: Iterable[tuple[np.ndarray, list[str]]],
    out_dir: Path,
    per_shard: int,
    quality: int = 95,
) -> list[Path]:
    """Write (image, captions) as img2dataset shards ``00000.tar``... (``<key>.jpg``,
    ``<key>.txt``: the first caption, ``<key>.json``: key, caption and every caption;
    ``per_shard`` samples each). Each tar appears whole or not at all (written, then renamed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tar, tmp = None, None
    for i, (image, captions) in enumerate(samples):
        if i % per_shard == 0:
            written += _close(tar, tmp)
            tmp = out_dir / f"{len(written):05d}.tar.tmp"
            tar = tarfile.open(tmp, "w")
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
        key = f"{i:09d}"
        meta = json.dumps({"key": key, "caption": captions[0], "captions": captions}).encode()
        txt = captions[0].encode()
        for ext, data in (("jpg", buf.getvalue()), ("txt", txt), ("json", meta)):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]
    return written + _close(tar, tmp)


def _close(tar: tarfile.TarFile | None, tmp: Path | None) -> list[Path]:
    if tar is None or tmp is None:
        return []
    tar.close()
    final = tmp.with_suffix("")
    tmp.replace(final)
    return [final]
