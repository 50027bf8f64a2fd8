"""Each open_clip tower as ``embed -> blocks[0..N-1] -> head``, so it can be split at any block.

Feature-level PGD needs the hidden state between two blocks: compute blocks ``<= L`` once, then
re-run only blocks ``> L`` and the head on ``h_L + delta``. A :class:`TowerSplit` exposes exactly
those pieces, computed with the same modules and in the same order as open_clip's own forward, so
``head(run(embed(x), 0, N))`` equals ``encode_image`` / ``encode_text`` bit for bit (tested).

Adapters are registered by the module type that holds the tower; unknown towers fail with the list
of supported ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import nn


@dataclass
class TowerSplit:
    """A tower cut into pieces. ``ctx`` carries per-batch state the blocks and head need."""

    blocks: list[nn.Module]
    embed_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
    block_fn: Callable[[nn.Module, torch.Tensor, dict[str, Any]], torch.Tensor]
    head_fn: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
    batch_dim: int = 0
    modules: list[nn.Module] = field(default_factory=list)  # every module the tower owns

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.embed_fn(x)

    def run(self, h: torch.Tensor, ctx: dict[str, Any], start: int, stop: int) -> torch.Tensor:
        """Apply blocks ``start .. stop-1``."""
        for blk in self.blocks[start:stop]:
            h = self.block_fn(blk, h, ctx)
        return h

    def head(self, h: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """Final hidden state -> un-normalised embedding."""
        return self.head_fn(h, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, ctx = self.embed(x)
        return self.head(self.run(h, ctx, 0, self.depth), ctx)


def _to_blocks_layout(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x if batch_first else x.transpose(0, 1).contiguous()


def _from_blocks_layout(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x if batch_first else x.transpose(0, 1)


def _vit_split(visual: VisionTransformer) -> TowerSplit:
    bf = visual.transformer.batch_first

    def embed(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return _to_blocks_layout(visual._embeds(x), bf), {}

    def head(h: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        pooled, _ = visual._pool(_from_blocks_layout(h, bf))
        return pooled @ visual.proj if visual.proj is not None else pooled

    return TowerSplit(
        blocks=list(visual.transformer.resblocks),
        embed_fn=embed,
        block_fn=lambda blk, h, ctx: blk(h, attn_mask=None),
        head_fn=head,
        batch_dim=0 if bf else 1,
        modules=[visual],
    )


def _resnet_split(visual: ModifiedResNet) -> TowerSplit:
    blocks = [
        b for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4) for b in stage
    ]
    return TowerSplit(
        blocks=blocks,
        embed_fn=lambda x: (visual.stem(x), {}),
        block_fn=lambda blk, h, ctx: blk(h),
        head_fn=lambda h, ctx: visual.attnpool(h),
        modules=[visual],
    )


def _project(x: torch.Tensor, projection: nn.Module | torch.Tensor | None) -> torch.Tensor:
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def _clip_text_split(model: CLIP) -> TowerSplit:
    """The text tower that open_clip's ``CLIP`` keeps inline (see ``CLIP.encode_text``)."""
    bf = model.transformer.batch_first

    def embed(text: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(text).to(cast_dtype)
        x = x + model.positional_embedding.to(cast_dtype)
        return _to_blocks_layout(x, bf), {"text": text}

    def head(h: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        x = model.ln_final(_from_blocks_layout(h, bf))
        eos = getattr(model, "text_eos_id", None)
        x = text_global_pool(x, ctx["text"], model.text_pool_type, eos_token_id=eos)
        return _project(x, model.text_projection)

    return TowerSplit(
        blocks=list(model.transformer.resblocks),
        embed_fn=embed,
        block_fn=lambda blk, h, ctx: blk(h, attn_mask=model.attn_mask),
        head_fn=head,
        batch_dim=0 if bf else 1,
        modules=[model.token_embedding, model.transformer, model.ln_final],
    )


def _text_transformer_split(text: TextTransformer) -> TowerSplit:
    """``CustomTextCLIP.text`` (see ``TextTransformer.forward``)."""
    bf = text.transformer.batch_first

    def embed(tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        x, attn_mask = text._embeds(tokens)
        return _to_blocks_layout(x, bf), {"text": tokens, "attn_mask": attn_mask}

    def head(h: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        x = _from_blocks_layout(h, bf)
        if text.cls_emb is not None:
            pooled = text.ln_final(text_global_pool(x, pool_type="last"))
        else:
            x = text.ln_final(x)
            eos = getattr(text, "eos_id", None)
            pooled = text_global_pool(x, ctx["text"], pool_type=text.pool_type, eos_token_id=eos)
        return _project(pooled, text.text_projection)

    return TowerSplit(
        blocks=list(text.transformer.resblocks),
        embed_fn=embed,
        block_fn=lambda blk, h, ctx: blk(h, attn_mask=ctx["attn_mask"]),
        head_fn=head,
        batch_dim=0 if bf else 1,
        modules=[text],
    )


IMAGE_TOWERS: dict[type, Callable[[Any], TowerSplit]] = {
    VisionTransformer: _vit_split,
    ModifiedResNet: _resnet_split,
}


def split_tower(model: nn.Module, tower: str) -> TowerSplit:
    """The ``image`` or ``text`` tower of an open_clip model (unwrapped, not DDP) as a split."""
    if tower == "image":
        factory = IMAGE_TOWERS.get(type(model.visual))
        if factory is None:
            known = ", ".join(t.__name__ for t in IMAGE_TOWERS)
            raise ValueError(
                f"image tower {type(model.visual).__name__} cannot be split; known: {known}"
            )
        return factory(model.visual)
    if tower == "text":
        if isinstance(model, CLIP):
            return _clip_text_split(model)
        if isinstance(model, CustomTextCLIP) and isinstance(model.text, TextTransformer):
            return _text_transformer_split(model.text)
        raise ValueError(
            f"text tower of {type(model).__name__} cannot be split; known: CLIP, CustomTextCLIP"
        )
    raise ValueError(f"tower: unknown tower {tower!r}; expected 'image' or 'text'")
