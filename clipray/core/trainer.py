"""One training run: AdamW + warmup/cosine, grad clipping, bf16 on GPU, exact resume.

:class:`Trainer` is the plain loop both entry points share: ``clipray train`` calls it in one
process, each Ray Train worker calls it under DDP. It knows nothing of Ray or MLflow; it reports
through :class:`Hooks`.

Determinism: the data order and caption choice of epoch ``e`` depend only on ``(seed, e)``,
and the torch RNG (PGD's random start, dropout) is reseeded from ``(seed, rank, step)`` before
every step, so the step *is* the RNG state, for every rank. A checkpoint holds model, optimizer,
scheduler and step; a run resumed from any checkpoint ends with the same weights as an
uninterrupted one (on CPU; tested).

Training data comes from the in-memory plan below (synthetic, CSV, Karpathy: unchanged) or, for
``kind: webdataset``, streamed from shards and decoded in worker processes
(:mod:`clipray.core.stream`: the same guarantees for a fixed number of ranks and decode
processes). Each checkpoint's metrics say how long the training thread waited for its batches
(``time/data_wait_s``, ``time/data_wait_fraction``) and, when streaming, how many damaged
samples were skipped (``data/skipped``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from clipray.config.schema import Experiment, WebDatasetData
from clipray.core import checkpoint
from clipray.core.contrastive import SINGLE, Ranks
from clipray.core.data import CaptionedImages, load_split
from clipray.core.device import autocast
from clipray.core.encode import clean_retrieval
from clipray.core.model import ClipModel, build_model
from clipray.core.shards import shard_list
from clipray.core.stream import BatchSource, StreamSpec, epoch_batches
from clipray.core.training_loss import ClipTrainingLoss


def step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct, reproducible torch seed per (run seed, rank, step)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class Hooks(Protocol):
    """What a training run tells its caller. Only rank 0's calls carry checkpoints.

    ``on_checkpoint`` returns True to end training there (an early stop); every rank must
    return the same answer.
    """

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, metrics: dict[str, float], blob: dict[str, Any] | None) -> bool: ...


class NoHooks:
    """Hooks for a run whose caller only wants the trained state (``Trainer.history`` keeps
    every checkpoint's metrics): reports nothing, never stops early."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, metrics: dict[str, float], blob: dict[str, Any] | None) -> bool:
        return False


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at ``total`` (open_clip's default schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains, biases and the temperature, as in CLIP."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass
class EpochPlan:
    """Which images and captions this rank trains on, per step, in one epoch."""

    order: np.ndarray  # image indices of the whole epoch, global batches back to back
    caption: np.ndarray  # caption index (into the flat token table) per image


class Trainer:
    def __init__(
        self,
        exp: Experiment,
        clip: ClipModel,
        train: CaptionedImages | StreamSpec,
        val: CaptionedImages,
        device: torch.device,
        ranks: Ranks = SINGLE,
        source: BatchSource = epoch_batches,
    ):
        self.exp, self.cfg, self.clip = exp, exp.train, clip
        self.source = source  # streamed batches: decode processes, or Ray Data in a sweep
        self.train_split, self.val_split = train, val
        self.device, self.ranks = device, ranks
        self.local_batch = self.cfg.batch_size // ranks.world_size
        self.stream = train if isinstance(train, StreamSpec) else None
        n = exp.data.train_samples if isinstance(exp.data, WebDatasetData) else len(train)
        self.steps_per_epoch = n // self.cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"train.batch_size: {self.cfg.batch_size} exceeds the {n} training images"
            )
        self.total_steps = self.steps_per_epoch * self.cfg.epochs
        if isinstance(train, CaptionedImages):  # in memory: a caption table, tokenized once
            texts, owner = train.flat_captions()
            self.tokens = clip.tokenize(texts)
            self.caption_start = np.searchsorted(owner.numpy(), np.arange(len(train)))
            self.caption_count = np.bincount(owner.numpy(), minlength=len(train))

        self.loss = ClipTrainingLoss(clip.model, exp.perturb, self.cfg.local_loss)
        self.wrapped: torch.nn.Module = self.loss
        if ranks.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.loss, device_ids=ids)
        self.optimizer = torch.optim.AdamW(
            param_groups(clip.model, self.cfg.weight_decay),
            lr=self.cfg.lr,
            betas=self.cfg.betas,
            eps=self.cfg.eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.cfg.warmup_steps, self.total_steps)
        )
        self.step = 0
        self.history: list[dict[str, float]] = []  # metrics of every checkpoint, kept in it
        self.resumed_from: int | None = None  # set by load_state_dict until the next checkpoint
        self.autocast = autocast(device, self.cfg.precision)

    # ------------------------------------------------------------------------------- data order
    def plan(self, epoch: int) -> EpochPlan:
        rng = np.random.default_rng([self.exp.seed, epoch])
        order = rng.permutation(len(self.train_split))
        pick = (rng.random(len(self.train_split)) * self.caption_count).astype(np.int64)
        return EpochPlan(order, self.caption_start + pick)

    def batch(self, plan: EpochPlan, step_in_epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._plan_batch()(plan, step_in_epoch)

    def _plan_batch(self) -> Callable[[EpochPlan, int], tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batch of a step, as a picklable function (for decode processes)."""
        return functools.partial(
            plan_batch,
            self.train_split,
            self.tokens,
            batch_size=self.cfg.batch_size,
            offset=self.ranks.rank * self.local_batch,
            local=self.local_batch,
            size=self.clip.image_size,
        )

    def batches(self, epoch: int, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(images, tokens, damaged samples skipped) for steps ``first..`` of ``epoch``: from
        the in-memory plan, or streamed from shards (decoded in worker processes)."""
        if self.stream is None:
            plan, workers = self.plan(epoch), getattr(self.exp.data, "loader_workers", 0)
            if isinstance(self.train_split.images, np.ndarray) or workers == 0:
                for s in range(first, self.steps_per_epoch):
                    yield (*self.batch(plan, s), 0)
                return
            steps = _PlanSteps(self._plan_batch(), plan, first, self.steps_per_epoch)  # files:
            loader = torch.utils.data.DataLoader(  # decoded in worker processes, in step order
                steps, batch_size=None, num_workers=workers, prefetch_factor=2
            )
            for images, tokens in loader:
                yield images, tokens, 0
            return
        with closing(self.source(self.stream, epoch, first, self.clip.tokenizer)) as stream:
            for b in stream:  # closed with this generator: the loader's workers end at once
                yield b.images, b.tokens, b.skipped

    # ------------------------------------------------------------------------------------ steps
    def train_step(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        torch.manual_seed(step_seed(self.exp.seed, self.ranks.rank, self.step))
        x = self.clip.normalize(images.to(self.device, non_blocking=True))
        with self.autocast:
            out = self.wrapped(x, tokens.to(self.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.clip.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            self.clip.model.logit_scale.clamp_(0, math.log(100))
        self.step += 1
        return out

    def fit(self, hooks: Hooks) -> None:
        """Train from ``self.step`` to the end, checkpointing as configured."""
        self.clip.model.train()
        first_step_at = time.time()  # wall clock, comparable across processes: orchestration cost
        while self.step < self.total_steps:
            epoch, first = divmod(self.step, self.steps_per_epoch)
            sums: dict[str, float] = {}
            done, t0, wait, skipped = 0, time.perf_counter(), 0.0, 0
            with closing(self.batches(epoch, first)) as batches:  # ends the stream's workers
                for s in range(first, self.steps_per_epoch):
                    t = time.perf_counter()
                    images, tokens, n_skipped = next(batches)
                    wait, skipped = wait + time.perf_counter() - t, skipped + n_skipped
                    out = self.train_step(images, tokens)
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    done += 1
                    hooks.on_step(
                        self.step, {f"train/{k}": float(v.detach()) for k, v in out.items()}
                    )
                    end_of_epoch = s + 1 == self.steps_per_epoch
                    every = self.cfg.checkpoint_every_steps
                    if end_of_epoch or (every and self.step % every == 0):
                        metrics = self._window(sums, done, time.perf_counter() - t0, wait, skipped)
                        if first_step_at is not None:
                            metrics["time/first_step_at"], first_step_at = first_step_at, None
                        if self._checkpoint(hooks, metrics, validate=end_of_epoch):
                            return  # stopped early by the caller
                        t0 = time.perf_counter()  # validation and saving are not training time
                        sums, done, wait, skipped = {}, 0, 0.0, 0

    def _window(
        self, sums: dict[str, float], done: int, elapsed: float, wait: float, skipped: int
    ) -> dict[str, float]:
        """Metrics of the steps since the last checkpoint; stops a run whose share of damaged
        samples passes ``data.max_skip_fraction``."""
        metrics = {f"train/{k}": v / done for k, v in sums.items()}
        metrics["train/samples_per_s"] = done * self.cfg.batch_size / elapsed
        metrics["time/steps_s"] = elapsed
        metrics["time/data_wait_s"] = wait  # the training thread waiting for its next batch
        metrics["time/data_wait_fraction"] = wait / elapsed
        if self.stream is not None:
            limit = self.exp.data.max_skip_fraction  # type: ignore[union-attr]
            read = skipped + done * self.local_batch
            metrics["data/skipped"] = float(skipped)
            if skipped > limit * read:
                raise ValueError(
                    f"data.max_skip_fraction: {skipped} of {read} training samples read by rank "
                    f"{self.ranks.rank} before step {self.step} were damaged (undecodable image "
                    f"or no caption), more than {limit:g}"
                )
        return metrics

    def _checkpoint(self, hooks: Hooks, metrics: dict[str, float], validate: bool) -> bool:
        metrics = dict(metrics, step=self.step, epoch=self.step / self.steps_per_epoch)
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        if self.resumed_from is not None:  # the first checkpoint after a restart says from where
            metrics["train/resumed_from_step"], self.resumed_from = self.resumed_from, None
        if self.ranks.rank == 0 and validate:
            t0 = time.perf_counter()
            val = clean_retrieval(
                self.clip, self.val_split, self.exp.eval.batch_size, self.device, self.cfg.precision
            )
            metrics.update({f"val/{k}": v for k, v in val.items()})
            metrics["time/validate_s"] = time.perf_counter() - t0
        self.history.append(metrics)
        return bool(
            hooks.on_checkpoint(metrics, self.state_dict() if self.ranks.rank == 0 else None)
        )

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """A snapshot (copies, on the CPU): training may go on while it is being saved."""
        return {
            "format": checkpoint.FORMAT,
            "model": {
                k: v.detach().to("cpu", copy=True) for k, v in self.clip.model.state_dict().items()
            },
            "optimizer": _to_cpu_copy(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "history": list(self.history),
            "rng": {"scheme": "reseeded per step", "seed": self.exp.seed},
            "config": self.exp.to_dict(),
        }

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        self.clip.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.step = int(blob["step"])
        self.history = list(blob.get("history", []))
        self.resumed_from = self.step


def plan_batch(
    split: CaptionedImages,
    tokens: torch.Tensor,
    plan: EpochPlan,
    step: int,
    *,
    batch_size: int,
    offset: int,
    local: int,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) of one rank's share (``offset``, ``local``) of step ``step``."""
    idx = plan.order[step * batch_size + offset :][:local]
    if isinstance(split.images, np.ndarray) and split.images.shape[1] == size:
        images = torch.from_numpy(split.images[idx])
    else:
        images = torch.from_numpy(np.stack([split.image(i, size) for i in idx]))
    return images, tokens[plan.caption[idx]]


class _PlanSteps(torch.utils.data.Dataset):
    """Steps ``first..end`` of an epoch plan as a map-style dataset: step k -> its batch."""

    def __init__(self, batch: Callable, plan: EpochPlan, first: int, end: int):
        self.make, self.plan, self.first, self.end = batch, plan, first, end

    def __len__(self) -> int:
        return self.end - self.first

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.make(self.plan, self.first + k)


def _to_cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu_copy(v) for v in obj]
    return obj


def build_trainer(
    exp: Experiment,
    device: torch.device,
    ranks: Ranks = SINGLE,
    resume: dict[str, Any] | None = None,
    source: BatchSource = epoch_batches,
) -> Trainer:
    """Seeded model (the same on every rank), data and trainer; restored from ``resume``;
    a webdataset training set streamed by ``source``."""
    torch.manual_seed(exp.seed)
    clip = build_model(exp.model, device)
    if isinstance(exp.data, WebDatasetData):
        train: CaptionedImages | StreamSpec = stream_spec(exp, clip.image_size, ranks)
    else:
        train = load_split(exp.data, "train")
    trainer = Trainer(exp, clip, train, load_split(exp.data, "val"), device, ranks, source)
    if resume is not None:
        trainer.load_state_dict(resume)
    return trainer


def stream_spec(exp: Experiment, size: int, ranks: Ranks = SINGLE) -> StreamSpec:
    """This rank's share of a webdataset training set (see :mod:`clipray.core.stream`)."""
    data = exp.data
    assert isinstance(data, WebDatasetData)
    return StreamSpec(
        shards=shard_list(data.train),
        seed=exp.seed,
        rank=ranks.rank,
        world=ranks.world_size,
        batch=exp.train.batch_size // ranks.world_size,
        size=size,
        caption_field=data.caption_field,
        shuffle_buffer=data.shuffle_buffer,
        workers=data.loader_workers,
    )
