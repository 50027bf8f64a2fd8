"""The members of a tar stream, read with a fraction of :mod:`tarfile`'s per-member cost.

Decoding a small JPEG costs about half a millisecond; :mod:`tarfile` spends another 20 us of
pure Python per member on its header (checksums, field conversions, its stream buffer), and a
WebDataset sample is two or three members, so header parsing was 12 % of the decode CPU a
shard loader needs (BENCHMARKS.md). This reader parses the same formats with bytes slicing:
POSIX ustar and its ``prefix`` field, pax extended headers (``path``, ``size``), GNU long names
(and GNU base-256 sizes), whole-archive gzip / bzip2 / xz compression; directories, links and
other non-file members are skipped. It reads sequentially, one member in memory at a time, so
it works on any readable stream (a local file, an object-store input stream).

Damage raises :class:`tarfile.ReadError` (a :class:`tarfile.TarError`, as ``tarfile`` would): a
header whose checksum does not match (not a tar), or an archive that ends inside a member.
``tests/test_tarstream.py`` compares it with ``tarfile`` member for member.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from collections.abc import Iterator
from tarfile import ReadError
from typing import IO

BLOCK = 512
READ_BUFFER = 1 << 20
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (and the old NUL form), contiguous file
_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\0", lzma.open))


def tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of each regular file in the tar ``stream``, in archive order."""
    try:
        yield from _members(_uncompressed(stream))
    except (EOFError, zlib.error, lzma.LZMAError) as e:  # gzip raises OSError, as does bz2
        raise ReadError(f"damaged compressed data ({e})") from None


def _members(f: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        header = f.read(BLOCK)
        if not header.strip(b"\0"):
            return  # the end-of-archive zero block (or a bare end of stream)
        if len(header) < BLOCK:
            raise ReadError("unexpected end of data in a header")
        _check(header)
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        data = _exactly(f, size)
        f.read(-size % BLOCK)  # padding to the next block
        if kind in (b"x", b"g"):
            if kind == b"x":  # applies to the next member only ("g": global, nothing we use)
                pax = _pax_records(data)
                if not pax.get("size", "0").isdigit():
                    raise ReadError(f"bad size in a pax header: {pax['size']!r}")
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind == b"K":  # GNU long link target of the next member (a link: skipped)
            continue
        name = pax.get("path") or long_name or _ustar_name(header)
        pax, long_name = {}, None
        if kind in _FILE_TYPES:
            yield name, data


def _uncompressed(stream: IO[bytes]) -> IO[bytes]:
    """``stream`` read in large chunks (an object-store stream may make one request per read),
    through a decompressor when the archive is compressed as a whole."""
    head = stream.read(6)
    buffered = io.BufferedReader(_Prefixed(head, stream), READ_BUFFER)
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            return opener(buffered)  # type: ignore[no-any-return]
    return buffered


class _Prefixed(io.RawIOBase):
    """Bytes already read from ``stream`` (to sniff the format), then the rest of it."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # all the BufferedReader above calls
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _check(header: bytes) -> None:
    """The header checksum (unsigned, or the signed form some old tars wrote)."""
    stored = header[148:156].rstrip(b"\0 ").strip()
    try:
        expected = int(stored, 8)
    except ValueError:
        raise ReadError("not a tar header (no checksum)") from None
    rest = header[:148] + b"        " + header[156:]
    if expected != sum(rest) and expected != sum(b - 256 if b > 127 else b for b in rest):
        raise ReadError("bad checksum in a tar header")


def _number(field: bytes) -> int:
    """An octal numeric field, or GNU's base-256 form (first byte 0x80 or 0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[:1] == b"\xff" else value
    digits = field.rstrip(b"\0 ").strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ReadError(f"bad number field in a tar header: {field!r}") from None


def _exactly(f: IO[bytes], size: int) -> bytes:
    data = f.read(size)
    if len(data) < size:
        raise ReadError("unexpected end of data inside a member")
    return data


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records."""
    out: dict[str, str] = {}
    pos = 0
    try:
        while pos < len(data) and data[pos : pos + 1] != b"\0":
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
            out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
            pos += max(length, 1)
    except ValueError:  # no length, not a number, a key that is not UTF-8
        raise ReadError("malformed pax header") from None
    return out
