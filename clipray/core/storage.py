"""Sweep storage: a local directory, an NFS path, or a ``scheme://`` URI (S3, GCS) via pyarrow.

Multi-node sweeps need storage every node can reach (Ray Tune and Ray Train write trial results
and checkpoints there); a local path is only right on one machine. Small files (the sweep
manifest, the baseline's metrics) are read and written through these helpers so the same code
serves every kind of storage. Writes are atomic where the filesystem allows.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
    """``base/part/...``; a URI keeps its query (``s3://b/p?endpoint_override=...``) at the end."""
    if not is_remote(base):
        return str(Path(_local(base), *parts))
    path, sep, query = base.partition("?")
    return "/".join([path.rstrip("/"), *parts]) + sep + query


def absolute(path: str) -> str:
    """Remote URIs as given; local paths (``file://`` ones too) absolute, so every process
    agrees on them."""
    return path if is_remote(path) else str(Path(_local(path)).expanduser().resolve())


def _local(path: str) -> str:
    return path.removeprefix("file://")


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path)


def exists(path: str) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_json(path: str) -> Any:
    if not is_remote(path):
        return json.loads(Path(path).read_text())
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return json.loads(f.read().decode())


def write_json(path: str, data: Any) -> None:
    """Write JSON atomically (temp file + rename) on local storage; one PUT on object stores."""
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


def write_text(path: str, text: str) -> None:
    """Write text atomically (temp file + rename) on local storage; one PUT on object stores."""
    if not is_remote(path):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        return
    fs, p = _fs(path)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def listdir(path: str) -> list[str]:
    """The names in directory ``path`` (none if it does not exist)."""
    if not is_remote(path):
        return sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else []
    fs, p = _fs(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        return Path(path).read_bytes()
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write bytes atomically (temp file + rename) on local storage; one PUT on object stores."""
    if not is_remote(path):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, p = _fs(path)
    with fs.open_output_stream(p) as f:
        f.write(data)


def remove(path: str) -> None:
    """Delete the file ``path``."""
    if not is_remote(path):
        Path(path).unlink(missing_ok=True)
        return
    fs, p = _fs(path)
    fs.delete_file(p)


def check_writable(path: str, field: str = "storage") -> None:
    """Create ``path`` if needed and prove a file can be written there; ValueError otherwise."""
    probe = join(path, f".clipray-write-test-{uuid.uuid4().hex}")
    try:
        if is_remote(path):
            fs, p = _fs(path)
            fs.create_dir(p, recursive=True)
            with fs.open_output_stream(_fs(probe)[1]) as f:
                f.write(b"ok")
            fs.delete_file(_fs(probe)[1])
        else:
            Path(path).mkdir(parents=True, exist_ok=True)
            Path(probe).write_text("ok")
            Path(probe).unlink()
    except (OSError, ValueError) as e:  # pyarrow's errors subclass these
        raise ValueError(f"{field}: cannot write to {path} ({e})") from None
