"""The one checkpoint format and the one way to read weights.

A clipray training checkpoint is one torch file holding a dict: ``format``, ``model`` (state
dict), ``optimizer``, ``scheduler``, ``step``, ``history`` (metrics of every checkpoint so far),
``rng`` and ``config`` (the experiment as a plain dict). Writes are atomic. Weights can also come
from any open_clip state-dict file (optionally under ``state_dict``, keys optionally prefixed
``module.`` by DDP). Every failure is a one-line ValueError naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clipray.config.errors import brief_text

FORMAT = "clipray-checkpoint-v1"


def save_checkpoint(path: Path, blob: dict[str, Any]) -> None:
    """Atomic: a reader sees the old file or the complete new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(blob, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read(path: Path, device: torch.device | str = "cpu") -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path}: file not found") from None
    except Exception as e:  # truncated or not a torch file
        raise ValueError(f"checkpoint {path}: cannot be read ({type(e).__name__})") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A clipray training checkpoint (on the CPU), with every part a reader relies on."""
    if path.exists() and not path.is_file():
        raise ValueError(f"checkpoint {path}: not a file")
    blob = _read(path)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: not a clipray training checkpoint")
    parts = {"model": Mapping, "config": Mapping, "optimizer": Mapping, "scheduler": Mapping}
    for key, kind in parts.items():
        if not isinstance(blob.get(key), kind):
            raise ValueError(f"checkpoint {path}: incomplete (no {key!r} inside)")
    step = blob.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint {path}: incomplete (no training 'step' inside)")
    return blob


def weights_in(blob: Any, source: str) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint or state-dict blob, ``module.`` prefixes removed."""
    if isinstance(blob, Mapping) and blob.get("format") == FORMAT:
        state = blob["model"]
    else:
        state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else blob
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: no state dict inside")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def read_weights(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The model weights of a clipray checkpoint or any open_clip state-dict file."""
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: file not found")
    return weights_in(_read(path, device), f"checkpoint {path}")


def load_state(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, architecture: str
) -> None:
    """Strictly load ``state`` into ``model`` (an ``architecture``); one-line ValueError naming
    ``source`` if it does not fit.

    A failed load may leave some tensors overwritten; the next successful one replaces all.
    """
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ValueError(
            f"{source}: does not fit {architecture} ({brief_text(first, 120)})"
        ) from None
