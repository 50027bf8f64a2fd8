"""Training: clean baseline exact, PGD training sound, resume exact."""

from __future__ import annotations

import math

import pytest
import torch
from open_clip.loss import ClipLoss

from clipray.core.trainer import build_trainer, lr_factor
from clipray.core.training_loss import ClipTrainingLoss
from tests.conftest import small_experiment

CPU = torch.device("cpu")


class Recorder:
    def __init__(self):
        self.steps, self.checkpoints = [], []

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_checkpoint(self, metrics, blob):
        self.checkpoints.append((metrics, blob))


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.clip.model.state_dict().items()}


def _train(*overrides: str, steps: int | None = None):
    trainer = build_trainer(small_experiment(*overrides), CPU)
    if steps is not None:
        trainer.total_steps = steps
    rec = Recorder()
    trainer.fit(rec)
    return trainer, rec


def test_epsilon_zero_or_steps_zero_is_bit_identical_to_clean_training():
    clean, _ = _train()
    for overrides in (
        ["perturb.epsilon=0", "perturb.steps=3"],
        ["perturb.epsilon=0.3", "perturb.steps=0"],
    ):
        other, _ = _train(*overrides)
        a, b = _params(clean), _params(other)
        assert all(torch.equal(a[k], b[k]) for k in a), overrides


def test_clean_step_matches_a_plain_open_clip_loop():
    """Independent reference: open_clip's own forward + ClipLoss + AdamW, same batches."""
    trainer = build_trainer(small_experiment("train.grad_clip=null"), CPU)
    ref = build_trainer(small_experiment("train.grad_clip=null"), CPU).clip.model
    decay = [p for n, p in ref.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in ref.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    cfg = trainer.cfg
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),  # CLIP's
        eps=1e-6,
    )
    loss_fn = ClipLoss()
    plan = trainer.plan(0)
    ours, theirs = [], []
    for s in range(trainer.steps_per_epoch):
        images, tokens = trainer.batch(plan, s)
        ours.append(float(trainer.train_step(images, tokens)["loss"].detach()))
        for g in opt.param_groups:  # warmup then cosine, written out independently
            w, total = cfg.warmup_steps, trainer.total_steps
            g["lr"] = cfg.lr * (
                (s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w)))
            )
        img, txt, scale = ref(trainer.clip.normalize(images), tokens)
        opt.zero_grad()
        loss = loss_fn(img, txt, scale)
        loss.backward()
        theirs.append(float(loss))
        opt.step()
        with torch.no_grad():
            ref.logit_scale.clamp_(0, math.log(100))
    assert ours == pytest.approx(theirs, rel=1e-5)
    for (name, p), q in zip(trainer.clip.model.named_parameters(), ref.parameters(), strict=True):
        if name.endswith("attn.in_proj_bias"):
            # The key bias cannot change attention (softmax is shift-invariant), so its gradient is
            # rounding noise that Adam rescales to full-size steps; compare its q and v parts only.
            p, q = p[: p.numel() // 3], q[: q.numel() // 3]
        # atol: a tenth of one Adam step (lr 1e-3). Adam rescales a gradient that is rounding
        # noise to a full-size step: a weight whose gradient is ~0 may drift by part of one.
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [
        ["perturb.tower=image", "perturb.layer=0"],
        ["perturb.tower=text", "perturb.layer=-1", "perturb.norm=l2"],
        ["perturb.tower=both", "perturb.layer=2", "perturb.epsilon_mode=absolute"],
    ],
    ids=["image-first", "text-last-l2", "both-mid-absolute"],
)
def test_adversarial_loss_reaches_every_parameter(overrides):
    exp = small_experiment(
        "perturb.epsilon=0.2", "perturb.steps=2", "perturb.adv_weight=1.0", *overrides
    )
    trainer = build_trainer(exp, CPU)
    images, tokens = trainer.batch(trainer.plan(0), 0)
    out = trainer.loss(trainer.clip.normalize(images), tokens)
    assert float(out["adv_loss"]) > float(out["clean_loss"])
    out["loss"].backward()  # adv_weight=1: only the adversarial pass carries gradient
    no_grad = [
        n for n, p in trainer.clip.model.named_parameters() if p.grad is None or not p.grad.any()
    ]
    assert not no_grad


def test_resume_from_a_checkpoint_gives_the_same_weights():
    over = ("train.epochs=2", "perturb.epsilon=0.2", "perturb.steps=2", "perturb.layer=1")
    straight, rec = _train(*over)
    assert len(rec.checkpoints) == 2
    first_epoch_blob = rec.checkpoints[0][1]
    resumed = build_trainer(small_experiment(*over), CPU, resume=first_epoch_blob)
    assert resumed.step == straight.steps_per_epoch
    resumed.fit(Recorder())
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_mid_epoch_checkpoints_resume_exactly():
    over = ("train.checkpoint_every_steps=3", "perturb.epsilon=0.2", "perturb.steps=1")
    straight, rec = _train(*over)
    mid = [blob for metrics, blob in rec.checkpoints if "val/rsum" not in metrics]
    assert mid and mid[0]["step"] == 3
    resumed = build_trainer(small_experiment(*over), CPU, resume=mid[0])
    resumed.fit(Recorder())
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_metrics_and_checkpoint_contents():
    trainer, rec = _train("perturb.epsilon=0.2", "perturb.steps=1")
    assert [s for s, _ in rec.steps] == list(range(1, trainer.total_steps + 1))
    metrics, blob = rec.checkpoints[-1]
    for key in (
        "train/loss",
        "train/clean_loss",
        "train/adv_loss",
        "train/samples_per_s",
        "train/lr",
        "val/rsum",
        "val/i2t_R1",
        "val/t2i_R10",
        "step",
        "epoch",
    ):
        assert key in metrics
    assert 0 <= metrics["val/rsum"] <= 600
    assert set(blob) >= {"model", "optimizer", "scheduler", "step", "rng", "config"}


def test_learning_rate_schedule():
    assert lr_factor(0, 4, 20) == 0.25 and lr_factor(3, 4, 20) == 1.0
    assert lr_factor(4, 4, 20) == 1.0
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 0, 10) == 1.0


def test_objective_module_is_what_ddp_would_wrap(small_exp):
    trainer = build_trainer(small_exp, CPU)
    assert isinstance(trainer.wrapped, ClipTrainingLoss)
    assert trainer.wrapped.model is trainer.clip.model


@pytest.mark.parametrize("tower", ["image", "text", "both"])
def test_noise_control_trains_through_the_same_path_without_pgd(tower):
    """kind=noise: a perturbed pass of the same size at the same layer, every parameter
    trained by it, and a loss change smaller than PGD's from the same start."""
    over = (
        "perturb.epsilon=0.3",
        "perturb.layer=1",
        "perturb.adv_weight=1.0",
        f"perturb.tower={tower}",
    )
    noisy = build_trainer(small_experiment("perturb.kind=noise", "perturb.steps=0", *over), CPU)
    adversarial = build_trainer(small_experiment("perturb.steps=3", *over), CPU)
    images, tokens = noisy.batch(noisy.plan(0), 0)
    x = noisy.clip.normalize(images)
    out = noisy.loss(x, tokens)
    assert float(out["adv_loss"]) != float(out["clean_loss"])
    assert float(adversarial.loss(x, tokens)["adv_loss"]) > float(out["adv_loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in noisy.clip.model.parameters())
