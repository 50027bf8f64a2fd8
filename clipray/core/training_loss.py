"""The training loss: CLIP's contrastive loss, plus feature-level PGD (or its random-noise
control) when it is active.

:class:`ClipTrainingLoss` is the module DDP wraps: its ``forward`` returns the loss, so DDP sees one
forward per step, while PGD inside it works on the *unwrapped* open_clip model and takes
``autograd.grad`` with respect to ``delta`` only (no parameter gradients, no DDP hooks).

With the perturbation inactive (epsilon = 0, or steps = 0 for PGD) ``forward`` is exactly
open_clip's clean forward and loss — the baseline is bit-identical to clean training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipray.config.schema import PerturbConfig
from clipray.core.contrastive import Ranks, contrastive_loss, gather_all, symmetric_ce
from clipray.core.perturb import noise, pgd, split_at
from clipray.core.towers import split_tower

ENCODERS = {"image": "encode_image", "text": "encode_text"}


class ClipTrainingLoss(nn.Module):
    """``forward(images, tokens) -> {"loss", "clean_loss", "adv_loss"}``; images normalised NCHW."""

    def __init__(self, model: nn.Module, perturb: PerturbConfig, local_loss: bool = False):
        super().__init__()
        self.model = model
        self.perturb = perturb
        self.local_loss = local_loss
        self.towers = ("image", "text") if perturb.tower == "both" else (perturb.tower,)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        ranks = Ranks.current()
        inputs = {"image": images, "text": tokens}
        scale = self.model.logit_scale.exp()
        if not self.perturb.active:
            feats = {
                t: getattr(self.model, ENCODERS[t])(x, normalize=True) for t, x in inputs.items()
            }
            gathered = {t: gather_all(f, ranks) for t, f in feats.items()}
            loss = contrastive_loss(
                gathered["image"], gathered["text"], scale, ranks, self.local_loss
            )
            return {"loss": loss, "clean_loss": loss.detach()}

        points = {
            t: split_at(split_tower(self.model, t), inputs[t], self.perturb.layer)
            for t in self.towers
        }
        clean = {
            t: F.normalize(points[t].finish(None), dim=-1)
            if t in points
            else getattr(self.model, ENCODERS[t])(x, normalize=True)
            for t, x in inputs.items()
        }
        gathered = {t: gather_all(f, ranks) for t, f in clean.items()}
        clean_loss = contrastive_loss(
            gathered["image"], gathered["text"], scale, ranks, self.local_loss
        )

        if self.perturb.kind == "noise":
            deltas = noise(points, self.perturb)
        else:
            deltas = pgd(points, self._adversary(gathered, scale.detach(), ranks), self.perturb)
        adv = dict(clean)
        adv.update({t: F.normalize(points[t].finish(deltas[t]), dim=-1) for t in points})
        adv_gathered = {t: gather_all(f, ranks) for t, f in adv.items()}
        adv_loss = contrastive_loss(
            adv_gathered["image"], adv_gathered["text"], scale, ranks, self.local_loss
        )
        w = self.perturb.adv_weight
        return {
            "loss": (1 - w) * clean_loss + w * adv_loss,
            "clean_loss": clean_loss.detach(),
            "adv_loss": adv_loss.detach(),
        }

    @staticmethod
    def _adversary(gathered: dict[str, list[torch.Tensor]], scale: torch.Tensor, ranks: Ranks):
        """PGD's objective: the global batch's loss with this rank's perturbed rows swapped in.

        Other ranks' features stay at their clean values, so PGD needs no communication.
        """
        fixed = {t: [p.detach() for p in parts] for t, parts in gathered.items()}

        def objective(feats: dict[str, torch.Tensor]) -> torch.Tensor:
            parts = {t: list(v) for t, v in fixed.items()}
            for t, f in feats.items():
                parts[t][ranks.rank] = F.normalize(f, dim=-1)
            return symmetric_ce(torch.cat(parts["image"]), torch.cat(parts["text"]), scale)

        return objective
