"""What the config is checked against about models: open_clip's architecture registry.

Any open_clip architecture (``ViT-B-32``, ``RN50``, ...) works, plus tiny configs shipped in
``clipray/config/model_configs`` and sized for CPU runs:

- ``clipray-tiny-vit``: 64 px, 4-block ViT (width 64) + 4-block text transformer; the schema's
  default model (tests and library calls without a file).
- ``clipray-small-vit``: 64 px, 8-block ViT (width 128); the perturbation benchmark's model.
- ``clipray-tiny-rn``: 64 px, 4-stage ModifiedResNet (open_clip's, with BatchNorm).
- ``clipray-tiny-rn-gn``: the same ResNet with GroupNorm in place of every BatchNorm; the default
  sweep's model. Per-image normalisation leaves it no running statistics for a corruption's
  shifted inputs to miss (BENCHMARKS.md "GroupNorm, uneven light").

Only architecture *facts* live here (depth per tower, input size, known pretrained tags), read
from open_clip's config registry without building a model, so validating an experiment needs no
torch model. Nothing here downloads: a ``pretrained`` tag must already be in open_clip's cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip

from clipray.config.errors import brief, brief_list, brief_text

BUNDLED_CONFIG_DIR = Path(__file__).parent / "model_configs"
BUNDLED_MODELS = tuple(sorted(p.stem for p in BUNDLED_CONFIG_DIR.glob("*.json")))
open_clip.add_model_config(BUNDLED_CONFIG_DIR)
# Bundled models whose image tower clipray builds with GroupNorm for open_clip's BatchNorm (their
# JSON is the BatchNorm twin's: open_clip's config has no norm choice for a ModifiedResNet).
GROUP_NORM_MODELS = frozenset({"clipray-tiny-rn-gn"})


def architecture(name: str) -> dict[str, Any]:
    """open_clip's config of ``name``; ValueError naming ``model.name`` if it is unknown."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        others = len(open_clip.list_models()) - len(BUNDLED_MODELS)
        raise ValueError(
            f"model.name: unknown model {brief(name)}; known: {', '.join(BUNDLED_MODELS)} and "
            f"{others} open_clip architectures (open_clip.list_models()), e.g. ViT-B-32, RN50"
        )
    return cfg


def tower_depths(name: str) -> dict[str, int]:
    """Perturbable blocks per tower, read from the architecture config (no model is built)."""
    cfg = architecture(name)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise ValueError(
            f"model.name: {brief(name)} uses a timm/Hugging Face tower; feature perturbation "
            "supports open_clip's own ViT, ModifiedResNet and text transformer"
        )
    layers = vision["layers"]
    image_depth = sum(layers) if isinstance(layers, (list, tuple)) else int(layers)
    return {"image": image_depth, "text": int(text["layers"])}


def image_size(name: str) -> int:
    """The model's square input side in pixels."""
    size = architecture(name)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def looks_like_file(value: str) -> bool:
    """A path rather than an open_clip pretrained tag (tags have no slash or file suffix)."""
    return "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))


def check_pretrained(name: str, pretrained: str | None) -> None:
    """A local weights file that exists, or a tag open_clip knows for this architecture."""
    if pretrained is None or Path(pretrained).is_file():
        return
    if looks_like_file(pretrained):
        raise ValueError(f"model.pretrained: file not found: {brief_text(pretrained, 200)}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        known = brief_list(tags, 5) if tags else "none for this architecture"
        raise ValueError(
            f"model.pretrained: {brief(pretrained)} is neither a file nor a pretrained tag of "
            f"{name} (known tags: {known})"
        )
