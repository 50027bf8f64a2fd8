"""Batched, no-grad embedding of images and captions; clean retrieval of a split.

Shared by training (per-epoch clean recall on val) and scoring (every corruption x severity), so
both measure retrieval the same way, in the precision training used (``train.precision``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clipray.core.data import CaptionedImages
from clipray.core.device import autocast
from clipray.core.metrics import retrieval_recall
from clipray.core.model import ClipModel


@torch.no_grad()
def embed_images(
    clip: ClipModel,
    images: np.ndarray | torch.Tensor,
    batch_size: int,
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """uint8 NxHxWx3 -> L2-normalised float32 embeddings on the CPU (``train.precision``).
    A numpy array (a read-only memory map too) is read one batch at a time."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        batch = torch.from_numpy(np.array(batch)) if isinstance(batch, np.ndarray) else batch
        x = clip.normalize(batch.to(device))
        with autocast(device, precision):
            out.append(F.normalize(clip.model.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(
    clip: ClipModel, tokens: torch.Tensor, batch_size: int, device: torch.device, precision: str
) -> torch.Tensor:
    """Tokens -> L2-normalised float32 embeddings on the CPU (``train.precision``)."""
    out = []
    for start in range(0, len(tokens), batch_size):
        with autocast(device, precision):
            feats = clip.model.encode_text(tokens[start : start + batch_size].to(device))
        out.append(F.normalize(feats.float(), dim=-1).cpu())
    return torch.cat(out)


def clean_retrieval(
    clip: ClipModel,
    split: CaptionedImages,
    batch_size: int,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """Recall@1/5/10 both ways and RSUM of ``split`` without corruption."""
    was_training = clip.model.training
    clip.model.eval()
    try:
        texts, owner = split.flat_captions()
        text_emb = embed_texts(clip, clip.tokenize(texts), batch_size, device, precision)
        images = split.load_all(clip.image_size)
        image_emb = embed_images(clip, images, batch_size, device, precision)
    finally:
        clip.model.train(was_training)
    return retrieval_recall(image_emb, text_emb, owner)
