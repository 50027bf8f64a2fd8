"""CLIP's symmetric contrastive loss, exact under ``torch.distributed``.

Every rank gathers all ranks' features, keeps its own (with gradient) in place and computes the
loss over the *global* batch, so the loss value equals the single-process loss on the same global
batch. Through the features, its gradient only reaches this rank's share, and DDP then *averages*
the ranks' gradients; so the gradient entering this rank's features is multiplied by
``world_size`` (values unchanged: ``x + (W - 1) * (x - x.detach())``). Parameters used by the loss
itself (the temperature) get the full gradient on every rank, which the average leaves as is.
Both together make DDP's gradient equal the single-process gradient on the global batch (tested).

``local_loss=True`` is open_clip's cheaper variant: each rank scores only its own rows against the
global batch (logits ``B_local x B_global``); the mean over ranks equals the global loss value, but
gradients through other ranks' rows are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the data-parallel group (0 of 1 without torch.distributed)."""

    rank: int = 0
    world_size: int = 1

    @staticmethod
    def current() -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return Ranks(dist.get_rank(), dist.get_world_size())
        return Ranks()


SINGLE = Ranks()


def gather_all(local: torch.Tensor, ranks: Ranks) -> list[torch.Tensor]:
    """Every rank's tensor (same shape on all ranks), detached except this rank's own."""
    if ranks.world_size == 1:
        return [local]
    parts = [torch.empty_like(local) for _ in range(ranks.world_size)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[ranks.rank] = local
    return parts


def contrastive_loss(
    all_image: list[torch.Tensor],
    all_text: list[torch.Tensor],
    logit_scale: torch.Tensor,
    ranks: Ranks = SINGLE,
    local_loss: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch, from :func:`gather_all`'s L2-normalised features."""
    image, text = all_image[ranks.rank], all_text[ranks.rank]
    if local_loss:
        labels = torch.arange(image.shape[0], device=image.device) + ranks.rank * image.shape[0]
        per_image = logit_scale * image @ torch.cat(all_text).T
        per_text = logit_scale * text @ torch.cat(all_image).T
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    w, r = ranks.world_size, ranks.rank
    if w > 1:
        all_image, all_text = list(all_image), list(all_text)
        all_image[r] = image + (w - 1) * (image - image.detach())
        all_text[r] = text + (w - 1) * (text - text.detach())
    return symmetric_ce(torch.cat(all_image), torch.cat(all_text), logit_scale)


def symmetric_ce(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """The CLIP loss on one batch whose i-th image and i-th text are the positive pair."""
    logits = logit_scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
