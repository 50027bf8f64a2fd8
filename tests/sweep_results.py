"""A small sweep's results as a finished sweep leaves them, without training: per trial the
per-query ranks of real retrieval (embeddings scored the way clipray.core.metrics scores them)
and the metrics clipray.core.metrics computes from the same embeddings."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from clipray.core.metrics import (
    corruption_summary,
    flatten_cell_metrics,
    flatten_clean,
    flatten_summary,
    retrieval_recall,
)

IMAGES, CAPTIONS_PER_IMAGE, DIM = 40, 2, 16
CELLS = (("gaussian_noise", 1), ("gaussian_noise", 3), ("fog", 1), ("speckle_noise", 2))
SPACE = {
    "perturb.layer": {"type": "int", "low": 0, "high": 3, "step": 1, "log": False},
    "perturb.epsilon": {"type": "loguniform", "low": 0.001, "high": 0.1},
    "perturb.kind": {"type": "choice", "values": ["pgd", "noise"]},
}


def ranks_of(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: torch.Tensor) -> dict:
    """{i2t, t2i}: 0-based rank of each query's best-ranked correct match (no ties here)."""
    scores = image_emb @ text_emb.T
    positive = owner[None, :] == torch.arange(len(image_emb))[:, None]
    best = scores.masked_fill(~positive, -torch.inf).amax(1, keepdim=True)
    i2t = (scores > best).sum(1)
    t2i = (scores.T > scores.T[torch.arange(len(owner)), owner][:, None]).sum(1)
    return {"i2t": i2t.numpy().astype(np.int32), "t2i": t2i.numpy().astype(np.int32)}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def trial(quality: float, seed: int, shift: float = 0.0) -> tuple[dict[str, float], dict]:
    """Metrics and ranks of one simulated model: lower ``quality`` = noisier embeddings;
    ``shift`` makes it more (>0) or less robust to the corruptions. Seed k: same eval set."""
    eval_set = torch.Generator().manual_seed(1234)
    concepts = torch.randn(IMAGES, DIM, generator=eval_set)
    owner = torch.arange(IMAGES).repeat_interleave(CAPTIONS_PER_IMAGE)
    model = torch.Generator().manual_seed(1000 * seed + int(quality * 100) + int(shift * 1000))
    noise = 1.0 / quality
    images = concepts + noise * torch.randn(IMAGES, DIM, generator=model)
    texts = _unit(concepts[owner] + noise * torch.randn(len(owner), DIM, generator=model))
    ranks, clean, corrupted = {}, None, {}
    for cell in [None, *CELLS]:
        extra = 0.0 if cell is None else max(0.0, 0.4 * cell[1] - shift)
        emb = _unit(images + extra * torch.randn(IMAGES, DIM, generator=model))
        metrics = retrieval_recall(emb, texts, owner)
        prefix = "clean" if cell is None else f"corrupt/{cell[0]}/s{cell[1]}"
        for direction, r in ranks_of(emb, texts, owner).items():
            ranks[f"{prefix}/{direction}"] = r
        if cell is None:
            clean = metrics
        else:
            corrupted[cell] = metrics
    ranks["text_to_image"] = owner.numpy().astype(np.int32)
    flat = {**flatten_clean(clean), **flatten_cell_metrics(corrupted)}
    return {**flat, **flatten_summary(corruption_summary(clean, corrupted))}, ranks


ARMS = {  # arm params: (quality, robustness shift)
    "baseline": ({"perturb.layer": 0, "perturb.epsilon": 0.0, "perturb.kind": "pgd"}, 1.6, 0.0),
    "strong": ({"perturb.layer": 1, "perturb.epsilon": 0.01, "perturb.kind": "pgd"}, 1.6, 0.5),
    "weak": ({"perturb.layer": 1, "perturb.epsilon": 0.003, "perturb.kind": "noise"}, 1.6, 0.0),
    "worse": ({"perturb.layer": 2, "perturb.epsilon": 0.05, "perturb.kind": "pgd"}, 1.0, 0.0),
}


def losses(params: dict, seed: int) -> dict[str, float]:
    """A trial's final-epoch train/clean_loss and train/adv_loss (NaN for the baseline, as
    results.csv has it): the gap grows with epsilon, PGD's faster than the noise control's."""
    clean = 2.0 + 0.1 * seed
    epsilon = params["perturb.epsilon"]
    if not epsilon:
        return {"train/clean_loss": clean, "train/adv_loss": float("nan")}
    rate = 20.0 if params["perturb.kind"] == "pgd" else 2.0
    return {"train/clean_loss": clean, "train/adv_loss": clean + rate * epsilon + 0.01 * seed}


def sweep_rows(
    arms: dict = ARMS, seeds: tuple[int, ...] = (0, 1), with_losses: bool = True
) -> tuple[list, dict]:
    """results.csv rows (typed) and {trial id: ranks} of every arm x seed; ``with_losses``:
    the training losses too (a sweep from before they were recorded has none)."""
    from clipray.analysis.results import arm_label

    rows, ranks = [], {}
    for n, (params, quality, shift) in enumerate(arms.values()):
        for seed in seeds:
            trial_id = f"t{n}_{seed}"
            metrics, ranks[trial_id] = trial(quality, seed, shift)
            row: dict[str, Any] = {"trial_id": trial_id, "trial": trial_id, "status": "FINISHED"}
            row.update(arm=arm_label(params), seed=seed, **params, **metrics)
            if with_losses:
                row.update(losses(params, seed))
            rows.append(row)
    return rows, ranks


def npz_bytes(ranks: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **ranks)
    return buf.getvalue()
