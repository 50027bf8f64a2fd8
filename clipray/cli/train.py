"""``clipray train``: one training run in this process (no Ray), with a progress bar and files.

Output directory::

    config.yaml      the resolved experiment
    checkpoint.pt    latest full training state (atomic); also what ``clipray score`` takes
    metrics.jsonl    one line per checkpoint: epoch metrics, clean recall on val

An existing run is never overwritten, nor a ``config.yaml`` of the user's: continue a run with
``--resume`` or choose another directory. The directory and the data are checked before anything
is written.
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
from clipray.config.paths import check_output_dir
from clipray.config.schema import Experiment
from clipray.core.checkpoint import load_checkpoint, save_checkpoint
from clipray.core.datacheck import check_dataset
from clipray.core.device import local_device
from clipray.core.trainer import build_trainer

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"


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
    """Check the output directory and the data, and return the checkpoint to continue from,
    if any. Writes nothing: every refusal leaves the directory as it was."""
    check_output_dir(out, "output directory")
    ckpt = out / CHECKPOINT
    if not resume:
        if ckpt.exists() or (out / METRICS).exists():
            raise ConfigError(
                f"{out}: a run is already there; pass --resume or choose another --out"
            )
        config = out / CONFIG
        if config.exists() and not _same_bytes(config, _config_text(exp)):
            raise ConfigError(
                f"{config}: a file of that name is already there (not this run's config); "
                "choose another --out"
            )
        check_dataset(exp)
        return None
    if not ckpt.exists():
        raise ConfigError(f"{out}: nothing to resume (no {CHECKPOINT})")
    blob = load_checkpoint(ckpt)
    if blob["config"] != exp.to_dict():
        raise ConfigError(f"{out}: the checkpoint was made with a different config; not resuming")
    _metric_lines(out / METRICS)  # readable before anything changes
    check_dataset(exp)
    return blob


def _config_text(exp: Experiment) -> str:
    return yaml.safe_dump(exp.to_dict(), sort_keys=False)


def _same_bytes(path: Path, text: str) -> bool:
    try:
        return path.is_file() and path.read_bytes() == text.encode()
    except OSError:
        return False


def _metric_lines(path: Path) -> list[tuple[int, str]]:
    """(step, line) of every line of a run's metrics.jsonl; one line naming it if damaged."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [(int(json.loads(line)["step"]), line) for line in lines if line.strip()]
    except (OSError, ValueError, KeyError, TypeError):  # JSON/UTF-8 errors are ValueErrors
        raise ConfigError(f"{path}: damaged (expected a JSON object per line)") from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, so none repeat."""
    if not path.exists():
        return
    keep = [line for s, line in _metric_lines(path) if s <= step]
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
        (out / CONFIG).write_text(_config_text(exp))
    else:
        _truncate_metrics(out / METRICS, int(blob["step"]))
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
    check_output_dir(out, "--out" if args.out else "storage")  # named as the user gave it
    device = local_device(exp.train.use_gpu)
    metrics = train_locally(exp, out, device, resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: round(v, 3) for k, v in metrics.items() if k.startswith("val/")}))
    return 0
