"""A scorer worker: holds a shard of eval cells and embeds them with each request's weights.

A plain class, made a Ray actor by :mod:`clipray.scoring.pool`; it imports no Ray itself, so it
can be tested and benchmarked in-process.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipray.config.loading import experiment_from_dict
from clipray.config.schema import ModelConfig
from clipray.core.checkpoint import load_state
from clipray.core.device import torch_threads
from clipray.core.encode import embed_images, embed_texts
from clipray.core.metrics import Cell, query_ranks, recall_from_ranks
from clipray.core.model import build_model
from clipray.scoring.cache import CorruptionCache, map_entry
from clipray.scoring.plan import CLEAN, EvalSet, weights_state

MODELS_KEPT = 2  # per worker: interleaved requests of two trials do not rebuild each other's


class ScorerWorker:
    """Holds a shard of eval cells; embeds them with the weights of each request."""

    def __init__(self, exp_dict: dict, cache_dir: str) -> None:
        self.exp = experiment_from_dict(exp_dict)
        scorers = self.exp.eval.scorers
        torch.set_num_threads(torch_threads(scorers.cpus_per_actor))
        self.device = torch.device("cuda" if scorers.gpus_per_actor > 0 else "cpu")
        self.precision = self.exp.train.precision  # score as the model was trained
        self.eval: EvalSet | None = None
        self.cache = CorruptionCache(cache_dir)
        self.cells: dict[Cell, Path] = {}  # verified cache entries, mapped only while in use
        self.models: OrderedDict[str, Any] = OrderedDict()  # request -> its model
        self.spare: list[Any] = []  # models of finished requests, for reuse
        self.counts: Counter[str] = Counter()

    def _attach(self, eval_set: EvalSet) -> None:
        """Take up the clean eval set, which comes with every call (a worker that was restarted
        has lost it; a constructor argument would have to outlive every restart)."""
        if self.eval is None:
            self.eval = eval_set
            self.clean = np.array(eval_set.images)  # writable copy of the object-store view
            self.owner = torch.from_numpy(np.array(eval_set.owner))

    def load_cell(self, eval_set: EvalSet, cell: Cell) -> None:
        """Build or load one cell into memory (idempotent)."""
        self._attach(eval_set)
        self._images(tuple(cell))

    def _images(self, cell: Cell) -> np.ndarray:
        """The cell's images: a read-only memory map of its cache entry, verified (or built)
        once, mapped afresh for each use, so what stays resident is about the cell being
        embedded, whatever the number of cells this worker holds."""
        if cell == CLEAN:
            return self.clean
        if cell not in self.cells:
            name, severity = cell
            spec = dict(split=self.eval.split, corruption=name, severity=severity)
            spec.update(seed=self.exp.eval.seed, fingerprint=self.eval.fingerprint)
            self.cache.get_or_build(self.clean, mmap=True, **spec)
            self.cells[cell] = self.cache.path_for(self.clean, **spec)
        return map_entry(self.cells[cell])

    def _model(self, request: str, blob: Any) -> Any:
        """The request's model: its weights loaded into a spare model of the pool's architecture
        (building one costs far more than loading weights), at most MODELS_KEPT of them."""
        if request in self.models:
            return self.models[request]
        name = self.exp.model.name
        state = weights_state(blob, name)
        if self.spare:
            clip = self.spare.pop()
        elif len(self.models) >= MODELS_KEPT:
            clip = self.models.popitem(last=False)[1]
        else:
            clip = build_model(ModelConfig(name=name), self.device)
            clip.model.eval()
        try:
            load_state(clip.model, state, "weights", name)
        except ValueError:
            self.spare.append(clip)
            raise
        self.models[request] = clip
        self.counts["checkpoint_loads"] += 1
        return clip

    def embed_texts(self, eval_set: EvalSet, request: str, blob: Any) -> torch.Tensor:
        self._attach(eval_set)
        clip = self._model(request, blob)
        self.counts["text_embeds"] += 1
        tokens = clip.tokenize(self.eval.texts)
        return embed_texts(clip, tokens, self.exp.eval.batch_size, self.device, self.precision)

    def score_cells(
        self, eval_set: EvalSet, request: str, blob: Any, text_emb: torch.Tensor, cells: list[Cell]
    ) -> dict[Cell, tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]]:
        """Per cell: its recall dict, and the per-query ranks it comes from (i2t, t2i)."""
        self._attach(eval_set)
        clip = self._model(request, blob)
        out = {}
        for cell in map(tuple, cells):
            images = self._images(cell)
            emb = embed_images(clip, images, self.exp.eval.batch_size, self.device, self.precision)
            ranks = query_ranks(emb, text_emb, self.owner)
            out[cell] = (
                recall_from_ranks(*ranks),
                tuple(r.numpy().astype(np.int32) for r in ranks),
            )
            self.counts["cells_scored"] += 1
        if self.models.pop(request, None) is clip:  # this request is done on this worker
            self.spare.append(clip)
        return out

    def stats(self) -> dict[str, int]:
        s = self.cache.stats
        return dict(self.counts, hits=s.hits, builds=s.builds, rejected=s.rejected)
