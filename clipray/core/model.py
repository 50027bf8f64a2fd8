"""open_clip models by name, with what is needed to feed them: tokenizer and input normalisation.

Architecture facts (depths, input size, the bundled tiny configs) are in
:mod:`clipray.config.architectures`; weights files are read by :mod:`clipray.core.checkpoint`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from clipray.config.architectures import (
    GROUP_NORM_MODELS,
    check_pretrained,
    image_size,
    tower_depths,
)
from clipray.config.schema import ModelConfig
from clipray.core.checkpoint import load_state, read_weights
from clipray.core.tokens import fast


@dataclass
class ClipModel:
    """A model with what is needed to feed it: tokenizer and image normalisation."""

    model: torch.nn.Module
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # (scale, shift) per device for normalize: made once, not per batch
    _affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (as corrupted and cached) -> float NCHW normalised for the model."""
        # One contiguous copy, then two in-place passes: (x / 255 - mean) / std as x * a + b.
        # (Converting the permuted view as it is, then three allocating ops, took 12x longer and
        # handed the model channels-last strides.)
        x = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        if x.device not in self._affine:
            std = torch.tensor(self.std, dtype=torch.float64).view(1, 3, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float64).view(1, 3, 1, 1)
            self._affine[x.device] = (
                (1.0 / (255.0 * std)).float().to(x.device),
                (-mean / std).float().to(x.device),
            )
        scale, shift = self._affine[x.device]
        return x.mul_(scale).add_(shift)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> ClipModel:
    """Build the architecture, then load ``pretrained`` weights (tag or file) if given."""
    tower_depths(cfg.name)  # validates the name and tower types
    check_pretrained(cfg.name, cfg.pretrained)
    pretrained_file = cfg.pretrained and Path(cfg.pretrained).is_file()
    tag = None if (cfg.pretrained is None or pretrained_file) else cfg.pretrained
    with _quiet_root_logger():  # open_clip warns "no pretrained weights" for every random init
        model = open_clip.create_model(cfg.name, pretrained=tag, device=device)
    if cfg.name in GROUP_NORM_MODELS:
        group_norm(model.visual)
        model.to(device)
    if pretrained_file:
        load_state(
            model,
            read_weights(Path(cfg.pretrained), device),
            f"checkpoint {cfg.pretrained}",
            cfg.name,
        )
    pp = model.visual.preprocess_cfg
    return ClipModel(
        model=model,
        tokenizer=tokenizer(cfg.name),
        image_size=image_size(cfg.name),
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
    )


def group_norm(module: torch.nn.Module) -> None:
    """Replace every BatchNorm2d under ``module`` with a freshly initialised GroupNorm: 8 groups,
    or fewer where a layer has under 32 channels (at least 4 channels a group)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            channels = child.num_features
            groups = max(1, min(8, channels // 4))
            setattr(module, name, torch.nn.GroupNorm(groups, channels, eps=child.eps))
        else:
            group_norm(child)


@dataclass(frozen=True)
class Tokenizer:
    """open_clip's tokenizer for ``name`` (made fast: :mod:`clipray.core.tokens`), built once
    per process: it pickles as its name (what decode processes and Ray Data tasks receive) rather
    than as its 2 MB vocabulary, which each Ray task would otherwise deserialize again (measured:
    a third of a task's time)."""

    name: str

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return _open_clip_tokenizer(self.name)(captions)


@functools.cache
def _open_clip_tokenizer(name: str) -> Any:
    with _quiet_root_logger():
        return fast(open_clip.get_tokenizer(name))


def tokenizer(name: str) -> Tokenizer:
    _open_clip_tokenizer(name)  # an unknown name fails here, not in a worker
    return Tokenizer(name)


def to_uint8_nhwc(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 NxHxWx3, got {t.dtype} {tuple(t.shape)}")
    return t
