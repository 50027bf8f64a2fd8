"""Cost of feature-level PGD, and of our training step, measured side by side in one run.

1. Step time (forward + backward of the training objective) with feature-PGD at layers
   {0, N/2, N-1} of an 8-block ViT and K in {1, 3}, as a ratio to a clean step, beside
   (a) the cost model ``1 + (K + 1) * u * s``: u = (N-1-L)/N, the share of the tower's blocks PGD
       re-runs, s = the perturbed tower's share of a clean step (measured here), K PGD passes plus
       one adversarial pass with parameter gradients; and
   (b) a naive PGD that re-runs the whole tower from the pixels for every step (a forward hook adds
       delta at block L), which is what one writes without splitting the tower.
2. Clean training-step throughput (samples/s) of ``Trainer.train_step`` against a plain loop over
   the same open_clip model and batch (open_clip forward, ClipLoss, backward, clip, AdamW).

Timings interleave the variants round by round and report medians, so machine noise hits all
variants alike.

    python benchmarks/bench_perturb.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clipray.config.loading import load_experiment
from clipray.config.schema import PerturbConfig
from clipray.core.contrastive import symmetric_ce
from clipray.core.model import build_model
from clipray.core.perturb import NORMS, feature_scale
from clipray.core.trainer import build_trainer
from clipray.core.training_loss import ClipTrainingLoss

MODEL = "clipray-small-vit"


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds after a warm-up."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def naive_pgd_step(model, images, tokens, cfg: PerturbConfig) -> None:
    """Feature PGD without splitting: the whole image tower runs from the pixels every step."""
    block = model.visual.transformer.resblocks[cfg.layer]
    delta_box: dict[str, torch.Tensor | None] = {"d": None}
    hook = block.register_forward_hook(
        lambda m, i, out: out + delta_box["d"] if delta_box["d"] is not None else out
    )
    try:
        text = model.encode_text(tokens, normalize=True)
        scale = model.logit_scale.exp()
        captured = {}
        probe = block.register_forward_hook(lambda m, i, out: captured.setdefault("h", out))
        image = model.encode_image(images, normalize=True)
        probe.remove()
        clean = symmetric_ce(image, text, scale)
        norm, h = NORMS[cfg.norm], captured["h"].detach()
        unit = feature_scale(h, cfg, 0)
        delta = norm.sample(h, cfg.epsilon * unit, 0)
        for _ in range(cfg.steps):
            delta.requires_grad_(True)
            delta_box["d"] = delta
            feats = F.normalize(model.encode_image(images), dim=-1)
            loss = symmetric_ce(feats, text.detach(), scale.detach())
            (g,) = torch.autograd.grad(loss, delta)
            step = cfg.resolved_step_size * unit * norm.direction(g, 0)
            delta = norm.project(delta.detach() + step, cfg.epsilon * unit, 0)
        delta_box["d"] = delta
        adv = symmetric_ce(model.encode_image(images, normalize=True), text, scale)
        ((1 - cfg.adv_weight) * clean + cfg.adv_weight * adv).backward()
    finally:
        hook.remove()
    model.zero_grad(set_to_none=True)


def pgd_table(batch: int, rounds: int) -> str:
    torch.manual_seed(0)
    clip = build_model(load_experiment(None, [f"model.name={MODEL}"]).model)
    model = clip.model
    depth = len(model.visual.transformer.resblocks)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, clip.image_size, clip.image_size, generator=g)
    tokens = clip.tokenize(["a large red circle in the center on a gray background"] * batch)

    def step(objective: ClipTrainingLoss) -> Callable[[], None]:
        def run() -> None:
            objective(images, tokens)["loss"].backward()
            model.zero_grad(set_to_none=True)

        return run

    def image_tower_only() -> None:
        model.encode_image(images).square().mean().backward()
        model.zero_grad(set_to_none=True)

    clean = ClipTrainingLoss(model, PerturbConfig())
    fns: dict[str, Callable[[], None]] = {"clean": step(clean), "image tower": image_tower_only}
    configs = {}
    for layer in (0, depth // 2, depth - 1):
        for k in (1, 3):
            cfg = PerturbConfig(tower="image", layer=layer, epsilon=0.1, steps=k)
            configs[(layer, k)] = cfg
            fns[f"split L{layer} K{k}"] = step(ClipTrainingLoss(model, cfg))
            fns[f"naive L{layer} K{k}"] = lambda c=cfg: naive_pgd_step(model, images, tokens, c)
    t = interleaved(fns, rounds)
    share = t["image tower"] / t["clean"]
    rows = [
        f"Model `{MODEL}` ({depth} image blocks), batch {batch}, CPU threads "
        f"{torch.get_num_threads()}; clean step {t['clean'] * 1e3:.0f} ms; image-tower share "
        f"of a clean step s = {share:.2f}; medians of {rounds} interleaved rounds.",
        "",
        "| layer L | K | split / clean | cost model | split / model | naive / clean "
        "| naive / split |",
        "|---|---|---|---|---|---|---|",
    ]
    for (layer, k), _cfg in configs.items():
        split, naive = (
            t[f"split L{layer} K{k}"] / t["clean"],
            t[f"naive L{layer} K{k}"] / t["clean"],
        )
        model_ratio = 1 + (k + 1) * (depth - 1 - layer) / depth * share
        rows.append(
            f"| {layer} | {k} | {split:.2f} | {model_ratio:.2f} | {split / model_ratio:.2f} "
            f"| {naive:.2f} | {naive / split:.2f} |"
        )
    return "\n".join(rows)


def _loops(batch: int):
    """Our ``Trainer.train_step`` and the plain open_clip loop, on the same model and batch."""
    exp = load_experiment(
        None, [f"train.batch_size={batch}", f"data.train_size={batch * 4}", "data.val_size=8"]
    )
    trainer = build_trainer(exp, torch.device("cpu"))
    ref_model = build_trainer(exp, torch.device("cpu")).clip.model
    opt = torch.optim.AdamW(ref_model.parameters(), lr=exp.train.lr, weight_decay=0.1)
    loss_fn = ClipLoss()
    images, tokens = trainer.batch(trainer.plan(0), 0)
    pixels = trainer.clip.normalize(images)

    def ours() -> None:
        trainer.train_step(images, tokens)

    def plain() -> None:
        img, txt, scale = ref_model(pixels, tokens)
        opt.zero_grad(set_to_none=True)
        loss_fn(img, txt, scale).backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            ref_model.logit_scale.clamp_(0, math.log(100))

    return exp, ours, plain


def plain_samples_per_s(batch: int, rounds: int) -> float:
    """The plain loop's throughput alone (the sweep benchmark's reference)."""
    _, _, plain = _loops(batch)
    return batch / interleaved({"plain": plain}, rounds)["plain"]


def throughput_table(batch: int, rounds: int) -> str:
    exp, ours, plain = _loops(batch)
    t = interleaved({"ours": ours, "plain": plain}, rounds)
    return "\n".join(
        [
            f"Model `{exp.model.name}`, batch {batch}; medians of {rounds} interleaved rounds.",
            "",
            "| loop | samples/s | ratio to plain |",
            "|---|---|---|",
            f"| plain open_clip loop | {batch / t['plain']:.0f} | 1.00 |",
            f"| clipray `Trainer.train_step` | {batch / t['ours']:.0f} | "
            f"{t['plain'] / t['ours']:.3f} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else 9
    print("### Feature-PGD step cost\n")
    print(pgd_table(batch=32, rounds=rounds))
    print("\n### Clean training-step throughput\n")
    print(throughput_table(batch=64, rounds=rounds * 2))


if __name__ == "__main__":
    main()
