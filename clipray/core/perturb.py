"""Feature-level PGD: an adversarial ``delta`` on a tower's hidden states at the output of block L;
and its control, :func:`noise`: a random ``delta`` of the same norm and radius.

Cost it should have (ARCHITECTURE.md): blocks ``0..L`` run once (in the clean pass); each PGD
step re-runs only blocks ``L+1..N-1`` and the head on ``h_L.detach() + delta`` and takes
``torch.autograd.grad(loss, delta)`` — no parameter gradients. The caller then runs the upper
blocks once more on ``h_L + delta*`` with gradients to all parameters.

Radius: ``epsilon`` in absolute units, or (``relative``) ``epsilon * RMS(h_L)`` per sample, because
feature scales differ by orders of magnitude between layers and towers. In ``l2`` the ball is on
the whole per-sample feature tensor, so a relative radius is ``epsilon * ||h_L||_2``: in both norms,
relative epsilon is a fraction of the per-element feature magnitude. The step size scales the same
way as epsilon.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clipray.config.schema import PerturbConfig
from clipray.core.towers import TowerSplit


@dataclass(frozen=True)
class Norm:
    """How a norm measures, steps and projects per sample (batch on ``batch_dim``)."""

    name: str
    measure: Callable[[torch.Tensor, int], torch.Tensor]  # per-sample size, broadcastable
    direction: Callable[[torch.Tensor, int], torch.Tensor]  # steepest ascent for a gradient
    project: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # onto ball of radius r
    sample: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # uniform-ish in the ball
    surface: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # random, on the boundary


def _per_sample(values: torch.Tensor, like: torch.Tensor, batch_dim: int) -> torch.Tensor:
    shape = [1] * like.ndim
    shape[batch_dim] = -1
    return values.view(shape)


def _l2(x: torch.Tensor, batch_dim: int) -> torch.Tensor:
    return _per_sample(x.movedim(batch_dim, 0).flatten(1).norm(dim=1), x, batch_dim)


def _linf_sample(like: torch.Tensor, radius: torch.Tensor, batch_dim: int) -> torch.Tensor:
    return (torch.rand_like(like) * 2 - 1) * radius


def _l2_sample(like: torch.Tensor, radius: torch.Tensor, batch_dim: int) -> torch.Tensor:
    # Gaussian direction, radius ~ U^(1/d): uniform in the ball (d is large, so near the sphere).
    g = torch.randn_like(like)
    d = like[0].numel() if batch_dim == 0 else like.select(batch_dim, 0).numel()
    u = _per_sample(torch.rand(like.shape[batch_dim], device=like.device), like, batch_dim)
    return g / _l2(g, batch_dim).clamp_min(1e-12) * radius * u.pow(1.0 / d).to(like.dtype)


def _l2_surface(like: torch.Tensor, radius: torch.Tensor, batch_dim: int) -> torch.Tensor:
    g = torch.randn_like(like)
    return g / _l2(g, batch_dim).clamp_min(1e-12) * radius


NORMS: dict[str, Norm] = {
    "linf": Norm(
        name="linf",
        measure=lambda x, b: _per_sample(x.movedim(b, 0).flatten(1).abs().amax(dim=1), x, b),
        direction=lambda g, b: g.sign(),
        project=lambda d, r, b: torch.maximum(torch.minimum(d, r), -r),
        sample=_linf_sample,
        # a corner of the box: where sign-gradient PGD steps end up, so the same size as PGD's
        surface=lambda like, r, b: torch.randint_like(like, 2).mul_(2).sub_(1) * r,
    ),
    "l2": Norm(
        name="l2",
        measure=_l2,
        direction=lambda g, b: g / _l2(g, b).clamp_min(1e-12),
        project=lambda d, r, b: d * (r / _l2(d, b).clamp_min(1e-12)).clamp(max=1.0),
        sample=_l2_sample,
        surface=_l2_surface,
    ),
}


def get_norm(name: str) -> Norm:
    if name not in NORMS:
        raise ValueError(f"perturb.norm: unknown norm {name!r}; known: {', '.join(NORMS)}")
    return NORMS[name]


def feature_scale(h: torch.Tensor, cfg: PerturbConfig, batch_dim: int) -> torch.Tensor:
    """Per-sample unit in which epsilon and the step size are expressed."""
    if cfg.epsilon_mode == "absolute":
        return torch.ones((), device=h.device, dtype=h.dtype)
    h = h.detach()
    numel = h.numel() // h.shape[batch_dim]
    rms = _l2(h, batch_dim) / numel**0.5
    return rms if cfg.norm == "linf" else rms * numel**0.5


@contextmanager
def batch_statistics_only(modules: list[nn.Module]) -> Iterator[None]:
    """Inside, every BatchNorm layer of ``modules`` normalises with its batch's own statistics
    and leaves its running statistics alone, for the perturbed passes (:meth:`SplitPoint.finish`
    with a delta: PGD's steps, the adversarial or noise pass): the running statistics describe
    clean features, and updating them in place would also break the clean pass's backward,
    which saved them."""
    norms = {
        id(m): m
        for module in modules
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }.values()
    saved = [(m, m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
    try:
        for m in norms:
            m.running_mean = m.running_var = m.num_batches_tracked = None
        yield
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count


@dataclass
class SplitPoint:
    """A tower's hidden state at the output of block ``layer`` and what is needed to finish it."""

    split: TowerSplit
    layer: int  # non-negative block index
    hidden: torch.Tensor  # h_L, attached to the graph of the clean pass
    ctx: dict[str, Any]

    def finish(self, delta: torch.Tensor | None) -> torch.Tensor:
        """Upper blocks and head on ``h_L + delta`` (gradients flow wherever inputs allow); a
        perturbed pass (any ``delta``) normalises with batch statistics only."""
        if delta is None:
            return self._upper(self.hidden)
        with batch_statistics_only(self.split.modules):
            return self._upper(self.hidden + delta)

    def _upper(self, h: torch.Tensor) -> torch.Tensor:
        return self.split.head(
            self.split.run(h, self.ctx, self.layer + 1, self.split.depth), self.ctx
        )


def pgd(
    points: dict[str, SplitPoint],
    objective: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    cfg: PerturbConfig,
) -> dict[str, torch.Tensor]:
    """Maximise ``objective(features)`` over one delta per tower; returns the detached deltas.

    ``objective`` receives the un-normalised features of the perturbed towers only.
    """
    norm = get_norm(cfg.norm)
    detached = {t: p.hidden.detach() for t, p in points.items()}
    scale = {t: feature_scale(h, cfg, points[t].split.batch_dim) for t, h in detached.items()}
    radius = {t: cfg.epsilon * s for t, s in scale.items()}
    deltas = {}
    for t, h in detached.items():
        b = points[t].split.batch_dim
        deltas[t] = norm.sample(h, radius[t], b) if cfg.random_start else torch.zeros_like(h)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            for d in deltas.values():
                d.requires_grad_(True)
            feats = {
                t: SplitPoint(p.split, p.layer, detached[t], p.ctx).finish(deltas[t])
                for t, p in points.items()
            }
            grads = torch.autograd.grad(objective(feats), list(deltas.values()))
            for (t, d), g in zip(list(deltas.items()), grads, strict=True):
                b = points[t].split.batch_dim
                step = cfg.resolved_step_size * scale[t] * norm.direction(g, b)
                deltas[t] = norm.project(d.detach() + step, radius[t], b)
    return {t: d.detach() for t, d in deltas.items()}


def noise(points: dict[str, SplitPoint], cfg: PerturbConfig) -> dict[str, torch.Tensor]:
    """The control for :func:`pgd`: per tower, a random delta on the boundary of the same ball
    (same norm, same radius, same layer), found without any gradient. With ``l2`` on the text
    tower the budget is spread over every token position, also those past the end of the text
    that a causal mask keeps from the feature, where PGD spends none: there the control is
    matched in norm but is effectively smaller (``linf``, the studies' norm, is not affected)."""
    out = {}
    for t, p in points.items():
        h, b = p.hidden.detach(), p.split.batch_dim
        out[t] = get_norm(cfg.norm).surface(h, cfg.epsilon * feature_scale(h, cfg, b), b)
    return out


def split_at(split: TowerSplit, x: torch.Tensor, layer: int) -> SplitPoint:
    """Run embed and blocks ``0..layer`` (with gradients) and stop there."""
    layer = layer % split.depth
    h, ctx = split.embed(x)
    return SplitPoint(split, layer, split.run(h, ctx, 0, layer + 1), ctx)
