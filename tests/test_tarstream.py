"""clipray's tar reader against the standard library's tarfile, member for member."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile

import numpy as np
import pytest

from clipray.core.tarstream import _number, tar_members

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def archive(members: list[tuple[str, bytes]], fmt: int, extra=()) -> bytes:
    """A tar of ``members`` (regular files) written by tarfile, plus ``extra`` TarInfos
    (directories, links) before them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info in extra:
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def reference(blob: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r|*") as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar if i.isfile()]


def random_members(rng: np.random.Generator, n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        depth = int(rng.integers(0, 4))
        dirs = "/".join("d" * int(rng.integers(1, 60)) for _ in range(depth))
        stem = f"{i:06d}" + "x" * int(rng.integers(0, 120))  # some names over 100 bytes
        name = f"{dirs}/{stem}.jpg" if dirs else f"{stem}.jpg"
        size = int(rng.choice([0, 1, 511, 512, 513, int(rng.integers(0, 40_000))]))
        out.append((name, rng.integers(0, 256, size, dtype=np.uint8).tobytes()))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_archives_read_as_tarfile_reads_them(fmt):
    rng = np.random.default_rng(list(FORMATS).index(fmt))
    for _ in range(5):
        members = random_members(rng, 40)
        if fmt == "ustar":  # ustar cannot hold a name over 100 bytes without a prefix split
            members = [(n[-100:].lstrip("/"), d) for n, d in members]
        blob = archive(members, FORMATS[fmt])
        assert list(tar_members(io.BytesIO(blob))) == reference(blob) == members


def test_unicode_names_long_names_and_non_file_members():
    members = [("größe/ä" * 30 + ".txt", b"caption"), ("a.jpg", b"\xff\xd8" * 300)]
    d = tarfile.TarInfo("folder")
    d.type = tarfile.DIRTYPE
    s = tarfile.TarInfo("link.jpg")
    s.type, s.linkname = tarfile.SYMTYPE, "a.jpg"
    far = tarfile.TarInfo("l" * 120 + ".jpg")  # GNU: a long name and a long link target
    far.type, far.linkname = tarfile.SYMTYPE, "t" * 120 + ".jpg"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        blob = archive(members, fmt, extra=(d, s, far))
        assert list(tar_members(io.BytesIO(blob))) == reference(blob) == members
    split = [("p" * 90 + "/" + "q" * 90 + ".jpg", b"z")]  # ustar: the prefix field holds "p..."
    blob = archive(split, tarfile.USTAR_FORMAT)
    assert list(tar_members(io.BytesIO(blob))) == reference(blob) == split


def test_pax_headers_override_the_path_and_size_of_the_next_member_only():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("short.jpg")
        info.size = 700
        info.pax_headers = {"path": "a/much/longer/name.jpg", "size": "700", "comment": "x=y"}
        tar.addfile(info, io.BytesIO(b"1" * 700))
        info = tarfile.TarInfo("next.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    blob = buf.getvalue()
    got = list(tar_members(io.BytesIO(blob)))
    assert got == reference(blob) == [("a/much/longer/name.jpg", b"1" * 700), ("next.txt", b"abc")]


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_whole_archive_compression(compress):
    members = random_members(np.random.default_rng(7), 20)
    blob = compress(archive(members, tarfile.PAX_FORMAT))
    assert list(tar_members(io.BytesIO(blob))) == reference(blob) == members


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_damaged_compressed_archives_raise_tarfiles_errors(compress):
    """Truncated or garbled compressed data: a TarError or an OSError (what the shard reader
    turns into one line naming the shard), never another exception."""
    blob = compress(archive(random_members(np.random.default_rng(5), 10), tarfile.PAX_FORMAT))
    garbled = blob[:40] + bytes(b ^ 0x55 for b in blob[40:200]) + blob[200:]
    for damaged in (blob[: len(blob) // 2], garbled):
        with pytest.raises((tarfile.TarError, OSError)):
            list(tar_members(io.BytesIO(damaged)))


class Trickle(io.RawIOBase):
    """A stream that returns at most 100 bytes per read (like a slow network stream)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.data[self.pos : self.pos + min(len(buffer), 100)]
        buffer[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


def test_a_stream_returning_short_reads():
    members = random_members(np.random.default_rng(3), 10)
    blob = archive(members, tarfile.GNU_FORMAT)
    assert list(tar_members(Trickle(blob))) == members


def test_numbers_as_tarfile_parses_them():
    for n in (0, 1, 511, 8**11 - 1, 8**11, 2**40, 2**62):
        field = tarfile.itn(n, 12, tarfile.GNU_FORMAT)
        assert _number(field) == tarfile.nti(field) == n
    for field in (b"00000001750\0", b"     1750 \0\0", b"\0" * 12):
        assert _number(field) == tarfile.nti(field)


@pytest.mark.parametrize(
    "blob, expected",
    [
        (b"no tar\n" * 80, "not a tar header"),  # what a text file given as a shard reads as
        (b"\x01" * 1024, "not a tar header"),
        (archive([("a.jpg", b"x" * 2000)], tarfile.PAX_FORMAT)[:1500], "end of data inside"),
        (archive([("a.jpg", b"x" * 10)], tarfile.GNU_FORMAT)[:300], "end of data in a header"),
    ],
)
def test_damage_raises_tarfiles_read_error(blob, expected):
    with pytest.raises(tarfile.ReadError, match=expected):
        list(tar_members(io.BytesIO(blob)))
    with pytest.raises(tarfile.ReadError):  # tarfile agrees it is damaged
        reference(blob)


@pytest.mark.parametrize("records", [b"garbage", b"12 size=x1\n", b"abc path=a\n"])
def test_a_malformed_pax_header_is_a_read_error(records):
    """A pax header (a member of type "x") whose records do not parse."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    pad = b"\0" * (-len(records) % 512)
    blob = info.tobuf(tarfile.USTAR_FORMAT) + records + pad + archive([("a.jpg", b"x")], 0)
    with pytest.raises(tarfile.ReadError, match="pax header"):
        list(tar_members(io.BytesIO(blob)))


def test_a_flipped_header_byte_is_a_bad_checksum():
    blob = bytearray(archive([("a.jpg", b"x" * 10)], tarfile.USTAR_FORMAT))
    blob[10] ^= 0x01
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(tar_members(io.BytesIO(bytes(blob))))


def test_empty_archives_and_streams_have_no_members():
    assert list(tar_members(io.BytesIO(archive([], tarfile.PAX_FORMAT)))) == []
    assert list(tar_members(io.BytesIO(b""))) == []
