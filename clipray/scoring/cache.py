"""Content-addressed on-disk cache of corrupted eval sets.

One entry per (clean-set fingerprint, split, resolution, corruption, severity, seed,
imagecorruptions version, wrapper version). The entry name is a sha256 of those fields, so a
change to any of them is a different file and stale entries are never read. Each entry is one
.npz holding the corrupted images and a JSON manifest (the key fields, shape, dtype and sha256
of the image bytes); it is written to a temp file in the same directory, fsynced and renamed
over the final name, so readers see either nothing or a whole entry, and concurrent builders of
the same entry (which write identical bytes) can only replace one whole file by another. An
entry that does not load, or whose manifest does not match, is rebuilt.

The .npz is stored uncompressed, so its images can be read memory-mapped (``mmap=True``): the
hash is verified by streaming the file (no pages stay resident), then the array is a read-only
view of the file, and a scorer holding many cells keeps only the cell it is embedding resident.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipray.config.corruption_names import check_name, check_severity
from clipray.scoring import corruptions as C

# Bump when the on-disk layout changes; part of every key, so old files are simply not found.
CACHE_FORMAT = 2  # 2: entries are read memory-mapped (the images member stored uncompressed)


def fingerprint_images(images: np.ndarray) -> str:
    """sha256 (hex) of a clean image array: dtype, shape and bytes in C order."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array, got {type(images).__name__}")
    digest = hashlib.sha256(f"{images.dtype.str}|{images.shape}|".encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


def _check_images(images: np.ndarray) -> None:
    """ValueError unless `images` is a non-empty uint8 NxHxWx3 stack corrupt() accepts."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[0] == 0:
        got = getattr(images, "shape", type(images).__name__)
        raise ValueError(f"images must be a non-empty uint8 array NxHxWx3, got {got}")
    C.check_image(images[0])


@dataclass(frozen=True)
class EntryKey:
    """Everything a cached corrupted set depends on."""

    fingerprint: str
    split: str
    resolution: tuple[int, int]
    corruption: str
    severity: int
    seed: int
    imagecorruptions_version: str = C.IMAGECORRUPTIONS_VERSION
    wrapper_version: str = C.WRAPPER_VERSION
    cache_format: int = CACHE_FORMAT

    def fields_json(self) -> dict[str, Any]:
        return {**asdict(self), "resolution": list(self.resolution)}

    def digest(self) -> str:
        """sha256 of the canonical JSON of all fields: the entry's file name."""
        text = json.dumps(self.fields_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class CacheStats:
    """Counters so callers can tell hits from builds (and see entries that were rebuilt)."""

    hits: int = 0
    builds: int = 0
    rejected: int = 0  # entries present on disk but unreadable or mismatched, then rebuilt
    last_hit: bool | None = None  # outcome of the latest get_or_build; None before any


def _write_atomic(path: Path, images: np.ndarray, manifest: dict[str, Any]) -> None:
    """Write an entry via temp file + fsync + os.replace in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, images=images, manifest=np.array(json.dumps(manifest)))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; entries are shared read-only data
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename; not every filesystem allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def map_entry(path: Path) -> np.memmap:
    """The images of an entry as a read-only memory map (no check: see ``_read_verified``).
    ValueError when the member is compressed or not a plain C-order array."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("images.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: images stored compressed")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: no zip member header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0}
        readers[(2, 0)] = np.lib.format.read_array_header_2_0
        if version not in readers:
            raise ValueError(f"{path}: .npy format {version} not supported")
        shape, fortran, dtype = readers[version](f)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: not a C-order plain array")
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _streamed_sha256(images: np.memmap) -> str:
    """sha256 of a mapped array's bytes, read with plain reads: nothing stays resident."""
    digest, left = hashlib.sha256(), images.nbytes
    with open(images.filename, "rb") as f:
        f.seek(images.offset)
        while left > 0:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _read_verified(
    path: Path, key: EntryKey, shape: tuple[int, ...], mmap: bool = False
) -> np.ndarray | None:
    """The entry's images if the file loads and its manifest matches key, shape and hash
    (``mmap``: a read-only memory map of them)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            manifest = json.loads(str(archive["manifest"]))
            images = map_entry(path) if mmap else archive["images"]
        digest = _streamed_sha256(images) if mmap else hashlib.sha256(images.data).hexdigest()
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, struct.error):
        return None
    ok = (
        isinstance(manifest, dict)
        and manifest.get("key") == key.fields_json()
        and manifest.get("shape") == list(shape) == list(images.shape)
        and manifest.get("dtype") == "uint8" == images.dtype.name
        and manifest.get("sha256") == digest
    )
    return images if ok else None


class CorruptionCache:
    """Corrupted eval sets on disk under `root`, built on first use and reused afterwards."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.stats = CacheStats()

    def key_for(
        self,
        images: np.ndarray,
        *,
        split: str,
        corruption: str,
        severity: int,
        seed: int,
        fingerprint: str | None = None,
    ) -> EntryKey:
        """Validate every input (ValueError) and return the entry key; touches no file.

        `fingerprint` may carry a precomputed fingerprint_images(images) so a sweep scoring
        many entries of one clean set hashes it once; it must describe these very images.
        """
        _check_images(images)
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty string, got {split!r}")
        if fingerprint is None:
            fingerprint = fingerprint_images(images)
        elif not (isinstance(fingerprint, str) and len(fingerprint) == 64):
            raise ValueError(f"fingerprint must be a sha256 hex string, got {fingerprint!r}")
        return EntryKey(
            fingerprint=fingerprint,
            split=split,
            resolution=(int(images.shape[1]), int(images.shape[2])),
            corruption=check_name(corruption),
            severity=check_severity(severity),
            seed=C.check_seed(seed),
        )

    def entry_path(self, key: EntryKey) -> Path:
        digest = key.digest()
        return self.root / digest[:2] / f"{digest}.npz"

    def path_for(self, images: np.ndarray, **spec: Any) -> Path:
        """Where the entry for these images and spec (see key_for) lives, built or not."""
        return self.entry_path(self.key_for(images, **spec))

    def lookup(self, images: np.ndarray, **spec: Any) -> np.ndarray | None:
        """The cached corrupted set if a valid entry exists, else None (never builds)."""
        key = self.key_for(images, **spec)
        return _read_verified(self.entry_path(key), key, images.shape)

    def has(self, images: np.ndarray, **spec: Any) -> bool:
        """Whether a valid entry exists (reads and verifies it)."""
        return self.lookup(images, **spec) is not None

    def get_or_build(self, images: np.ndarray, *, mmap: bool = False, **spec: Any) -> np.ndarray:
        """The corrupted set for these images and spec (see key_for): from disk when valid, else
        corrupt_batch() and store it. ``mmap``: a read-only memory map of the entry on disk,
        also right after building it."""
        key = self.key_for(images, **spec)
        path = self.entry_path(key)
        cached = _read_verified(path, key, images.shape, mmap)
        self.stats.last_hit = cached is not None
        if cached is not None:
            self.stats.hits += 1
            return cached
        if path.exists():
            self.stats.rejected += 1
        built = C.corrupt_batch(images, key.corruption, key.severity, key.seed)
        manifest = {
            "key": key.fields_json(),
            "shape": list(built.shape),
            "dtype": "uint8",
            "sha256": hashlib.sha256(built.data).hexdigest(),
        }
        _write_atomic(path, built, manifest)
        self.stats.builds += 1
        return map_entry(path) if mmap else built
