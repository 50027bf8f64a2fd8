"""open_clip models by name, the bundled tiny configs, tokenizer and input normalisation.

Any open_clip architecture (``ViT-B-32``, ``RN50``, ...) works, plus tiny configs shipped in
``clipray/model_configs`` and sized for CPU runs:

- ``clipray-tiny-vit``: 64 px, 4-block ViT (width 64) + 4-block text transformer; the default.
- ``clipray-small-vit``: 64 px, 8-block ViT (width 128); the perturbation benchmark's model.
- ``clipray-tiny-rn``: 64 px, 4-stage ModifiedResNet; exercises the convolutional tower.

Nothing here downloads: a ``pretrained`` tag must already be in open_clip's cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from clipray.config import ModelConfig, check_pretrained

BUNDLED_CONFIG_DIR = Path(__file__).parent / "model_configs"
BUNDLED_MODELS = tuple(sorted(p.stem for p in BUNDLED_CONFIG_DIR.glob("*.json")))
open_clip.add_model_config(BUNDLED_CONFIG_DIR)

CHECKPOINT_FORMAT = "clipray-checkpoint-v1"


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


def _architecture(name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        others = len(open_clip.list_models()) - len(BUNDLED_MODELS)
        raise ValueError(
            f"model.name: unknown model {name!r}; known: {', '.join(BUNDLED_MODELS)} and "
            f"{others} open_clip architectures (open_clip.list_models()), e.g. ViT-B-32, RN50"
        )
    return cfg


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def tower_depths(name: str) -> dict[str, int]:
    """Perturbable blocks per tower, read from the architecture config (no model is built)."""
    cfg = _architecture(name)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise ValueError(
            f"model.name: {name!r} uses a timm/Hugging Face tower; feature perturbation supports "
            "open_clip's own ViT, ModifiedResNet and text transformer"
        )
    layers = vision["layers"]
    image_depth = sum(layers) if isinstance(layers, (list, tuple)) else int(layers)
    return {"image": image_depth, "text": int(text["layers"])}


def image_size(name: str) -> int:
    size = _architecture(name)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> ClipModel:
    """Build the architecture, then load ``pretrained`` weights (tag or file) if given."""
    tower_depths(cfg.name)  # validates the name and tower types
    check_pretrained(cfg)
    pretrained_file = cfg.pretrained and Path(cfg.pretrained).is_file()
    tag = None if (cfg.pretrained is None or pretrained_file) else cfg.pretrained
    with _quiet_root_logger():  # open_clip warns "no pretrained weights" for every random init
        model = open_clip.create_model(cfg.name, pretrained=tag, device=device)
    if pretrained_file:
        load_weights(model, Path(cfg.pretrained), device=device)
    pp = model.visual.preprocess_cfg
    return ClipModel(
        model=model,
        tokenizer=tokenizer(cfg.name),
        image_size=image_size(cfg.name),
        mean=tuple(pp["mean"]),
        std=tuple(pp["std"]),
    )


def tokenizer(name: str) -> Any:
    with _quiet_root_logger():
        return open_clip.get_tokenizer(name)


def load_weights(model: torch.nn.Module, path: Path, device: torch.device | str = "cpu") -> None:
    """Load a clipray training checkpoint or any open_clip state-dict file into ``model``."""
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: file not found")
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or not a torch file
        raise ValueError(f"checkpoint {path}: cannot be read ({type(e).__name__})") from None
    if isinstance(blob, dict) and blob.get("format") == CHECKPOINT_FORMAT:
        state = blob["model"]
    else:
        state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: no state dict inside")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise ValueError(f"checkpoint {path}: does not fit this architecture ({first})") from None


def to_uint8_nhwc(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 NxHxWx3, got {t.dtype} {tuple(t.shape)}")
    return t
