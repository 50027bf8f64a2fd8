"""``clipray train``: one training run in this process (no Ray), with a progress bar and files.

Output directory::

    config.yaml      the resolved experiment
    checkpoint.pt    latest full training state (atomic); also what ``clipray score`` takes
    metrics.jsonl    one line per checkpoint: epoch metrics, clean recall on val

An existing run is never overwritten: continue it with ``--resume`` or choose another directory.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from clipray.config.errors import ConfigError
from clipray.config.loading import load_experiment
from clipray.config.schema import Experiment
from clipray.core.checkpoint import load_checkpoint, save_checkpoint
from clipray.core.device import local_device
from clipray.core.trainer import build_trainer

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class _FileHooks:
    """Rank-0 hooks of a local run: progress bar, checkpoint file, metrics lines."""

    def __init__(self, out: Path, bar: tqdm | None):
        self.out, self.bar = out, bar
        self.last: dict[str, float] = {}

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")

    def on_checkpoint(self, metrics: dict[str, float], blob: dict[str, Any] | None) -> bool:
        if blob is not None:
            save_checkpoint(self.out / CHECKPOINT, blob)
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.last = metrics
        if self.bar is not None and "val/rsum" in metrics:
            self.bar.write(
                f"epoch {metrics['epoch']:.0f}: loss {metrics['train/loss']:.3f}  "
                f"val rsum {metrics['val/rsum']:.1f}  "
                f"{metrics['train/samples_per_s']:.0f} samples/s"
            )
        return False  # a local run always trains to the end


def _prepare(exp: Experiment, out: Path, resume: bool) -> dict[str, Any] | None:
    """Check the output directory and return the checkpoint to continue from, if any."""
    ckpt = out / CHECKPOINT
    if not resume:
        if ckpt.exists() or (out / METRICS).exists():
            raise ConfigError(
                f"{out}: a run is already there; pass --resume or choose another --out"
            )
        return None
    if not ckpt.exists():
        raise ConfigError(f"{out}: nothing to resume (no {CHECKPOINT})")
    blob = load_checkpoint(ckpt)
    if blob["config"] != exp.to_dict():
        raise ConfigError(f"{out}: the checkpoint was made with a different config; not resuming")
    _truncate_metrics(out / METRICS, int(blob["step"]))
    return blob


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, so none repeat."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def train_locally(
    exp: Experiment, out: Path, device: torch.device, resume: bool = False, progress: bool = True
) -> dict[str, float]:
    """Train to the end (or from the last checkpoint) and return the final epoch's metrics."""
    blob = _prepare(exp, out, resume)
    trainer = build_trainer(exp, device, resume=blob)  # bad data or config fails before any write
    if blob is None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(exp.to_dict(), sort_keys=False))
    bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", disable=not progress)
    hooks = _FileHooks(out, bar)
    try:
        trainer.fit(hooks)
    finally:
        bar.close()
    return hooks.last or (trainer.history[-1] if trainer.history else {})


def cmd_train(args: argparse.Namespace) -> int:
    """One training run on this machine, without Ray."""
    exp = load_experiment(args.file, args.set)
    out = Path(args.out) if args.out else Path(exp.storage) / exp.name / "train"
    device = local_device(exp.train.use_gpu)
    metrics = train_locally(exp, out, device, resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: round(v, 3) for k, v in metrics.items() if k.startswith("val/")}))
    return 0
