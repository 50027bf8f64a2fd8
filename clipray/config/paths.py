"""Where a command may write: output directories and files, checked before any work starts.

A check leaves nothing behind: the directories it had to create to prove it could, and the probe
file it wrote, are removed again. So a command refused here (or later, by another check) leaves
no empty directory, and a command accepted here does not fail after its work for want of a
place to put the result.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from clipray.config.errors import ConfigError, brief_text


def _show(path: Path) -> str:
    return brief_text(str(path), 160)


def check_output_dir(path: str | Path, what: str) -> Path:
    """``path`` is a directory a file can be written in, or one can be created there; the
    absolute path, or one ConfigError naming ``what`` and the path."""
    path = Path(path).expanduser().absolute()
    created: list[Path] = []
    try:
        missing = []
        existing = path
        while not (existing.exists() or existing.is_symlink()):
            missing.append(existing)
            existing = existing.parent
        if not existing.is_dir():
            if existing == path:
                raise ConfigError(f"{what}: cannot write to {_show(path)}: not a directory")
            raise ConfigError(
                f"{what}: cannot write to {_show(path)}: {_show(existing)} is not a directory"
            )
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        probe = path / f".clipray-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:  # permission, read-only file system, a name too long, a symlink loop
        raise ConfigError(f"{what}: cannot write to {_show(path)} ({e.strerror or e})") from None
    finally:
        for folder in reversed(created):
            try:
                os.rmdir(folder)
            except OSError:
                pass
    return path


def check_output_file(path: str | Path, what: str) -> Path:
    """``path`` can be written as a file: not a directory, and its folder exists or can be."""
    path = Path(path).expanduser().absolute()
    try:
        is_dir = path.is_dir()
    except OSError as e:
        raise ConfigError(f"{what}: unusable path {_show(path)} ({e.strerror or e})") from None
    if is_dir:
        raise ConfigError(f"{what}: {_show(path)} is a directory; expected a file name")
    if len(path.name.encode()) > 255:
        raise ConfigError(f"{what}: file name too long ({len(path.name.encode())} bytes)")
    check_output_dir(path.parent, what)
    return path
