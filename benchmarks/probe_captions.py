"""What has a model trained on the synthetic layout captions learnt? A foil test, per fact.

For each image of a split, its first layout caption is paired with foils that change one fact of
one shape: its kind, its size, its place (moved to a free grid cell), the shape dropped (the
count), or the kinds of two shapes swapped (binding: the same kinds and places, wrongly paired).
A fact is learnt when the image is closer to its true caption than to the foil far more often than
half the time (0.5 is chance), and the text tower tells the two apart (cosine well below 1).

    python benchmarks/probe_captions.py RUN_DIR [--split val] [--n 256]

RUN_DIR is a ``clipray train --out`` directory (its config.yaml and checkpoint.pt) trained on
``data.kind: synthetic`` with ``captions: layout``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from clipray.config.loading import load_experiment
from clipray.core.checkpoint import read_weights
from clipray.core.encode import embed_images, embed_texts
from clipray.core.model import build_model, tokenizer
from clipray.core.synthetic import (
    LAYOUT_TEMPLATES,
    POSITIONS,
    SHAPES,
    SIZES,
    _describe,
    synthetic_image,
)

FOILS = ("kind", "size", "place", "drop", "swap kinds")


def parse(caption: str) -> list[tuple[str, str, int]]:
    """(size, kind, cell) of each shape a layout caption (template 0) names, in its order."""
    shapes = []
    for part in caption.replace(" and ", ", ").split(", "):
        _, size, kind, *place = part.split(" ")
        shapes.append((size, kind, POSITIONS.index(" ".join(place))))
    return shapes


def describe(shapes: list[tuple[str, str, int]]) -> str:
    ordered = sorted(shapes, key=lambda s: s[2])  # layout captions list shapes in reading order
    parts = [_describe((kind, None, size, cell), colour=False) for size, kind, cell in ordered]
    return LAYOUT_TEMPLATES[0](parts, len(shapes))


def foil(shapes: list, which: str, rng: np.random.Generator) -> list | None:
    out = [list(s) for s in shapes]
    j = int(rng.integers(len(out)))
    if which == "kind":
        out[j][1] = str(rng.choice([k for k in SHAPES if k != out[j][1]]))
    elif which == "size":
        out[j][0] = next(s for s in SIZES if s != out[j][0])
    elif which == "place":
        free = [c for c in range(len(POSITIONS)) if c not in {s[2] for s in out}]
        out[j][2] = int(rng.choice(free))
    elif which == "drop":
        del out[j]
    else:
        pairs = [(a, b) for a in range(len(out)) for b in range(a) if out[a][1] != out[b][1]]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        out[a][1], out[b][1] = out[b][1], out[a][1]
    return [tuple(s) for s in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args()
    exp = load_experiment(args.run / "config.yaml", [])
    if exp.data.kind != "synthetic" or exp.data.captions != "layout":
        raise SystemExit(f"{args.run}: the probe needs data.kind synthetic with captions: layout")
    clip = build_model(exp.model)
    clip.model.load_state_dict(read_weights(args.run / "checkpoint.pt"))
    clip.model.eval()
    tok, cpu, rng = tokenizer(exp.model.name), torch.device("cpu"), np.random.default_rng(0)
    images, true, foils = [], [], {f: [] for f in FOILS}
    for i in range(args.n):
        image, captions = synthetic_image(exp.data, args.split, i)
        shapes = parse(captions[0])
        images.append(image)
        true.append(describe(shapes))
        for which in FOILS:
            changed = foil(shapes, which, rng)
            foils[which].append(describe(changed) if changed else None)

    def embed(texts: list[str]) -> torch.Tensor:
        return embed_texts(clip, tok(texts), 256, cpu, "fp32")

    img = embed_images(clip, np.stack(images), 256, cpu, "fp32")
    txt = embed(true)
    print("| foil | n | true caption closer | text cosine (true, foil) |\n|---|---|---|---|")
    for which, texts in foils.items():
        keep = [i for i, t in enumerate(texts) if t is not None]
        other = embed([texts[i] for i in keep])
        wins = ((img[keep] * txt[keep]).sum(1) > (img[keep] * other).sum(1)).float().mean()
        cosine = (txt[keep] * other).sum(1).mean()
        print(f"| {which} | {len(keep)} | {wins:.2f} | {cosine:.3f} |")


if __name__ == "__main__":
    main()
