"""Feature-level PGD: stays in its ball, raises the loss, costs no parameter gradients; its noise
control: the same ball, a random direction."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipray.config.architectures import BUNDLED_MODELS  # noqa: F401  (registers the bundled configs)
from clipray.config.schema import PerturbConfig
from clipray.core.contrastive import symmetric_ce
from clipray.core.perturb import NORMS, feature_scale, get_norm, noise, pgd, split_at
from clipray.core.towers import split_tower
from clipray.core.training_loss import ClipTrainingLoss


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("clipray-tiny-vit")


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (8, 32), generator=g)
    tokens[:, 12] = 49407
    tokens[:, 13:] = 0
    return torch.randn(8, 3, 64, 64, generator=g), tokens


def _objective(model, batch, tower):
    """Loss of the perturbed tower's features against the other tower's fixed features."""
    images, tokens = batch
    with torch.no_grad():
        other = (
            model.encode_text(tokens, True)
            if tower == "image"
            else model.encode_image(images, True)
        )
    scale = model.logit_scale.exp().detach()

    def objective(feats):
        f = F.normalize(feats[tower], dim=-1)
        return symmetric_ce(f, other, scale) if tower == "image" else symmetric_ce(other, f, scale)

    return objective


def _point(model, batch, tower, layer):
    x = batch[0] if tower == "image" else batch[1]
    return split_at(split_tower(model, tower), x, layer)


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("mode", ["absolute", "relative"])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_delta_stays_inside_its_ball(model, batch, norm, mode, tower):
    cfg = PerturbConfig(
        tower=tower, layer=1, epsilon=0.3, steps=3, norm=norm, epsilon_mode=mode, step_size=0.5
    )  # a large step so projection matters
    point = _point(model, batch, tower, 1)
    torch.manual_seed(0)
    delta = pgd({tower: point}, _objective(model, batch, tower), cfg)[tower]
    radius = cfg.epsilon * feature_scale(point.hidden, cfg, 0)
    size = get_norm(norm).measure(delta, 0)
    assert torch.all(size <= radius * (1 + 1e-5))
    assert torch.all(size >= radius * 0.5)  # and it uses the ball, not a tiny corner of it
    assert not delta.requires_grad


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_pgd_increases_the_loss_over_its_random_start(model, batch, tower, norm):
    objective = _objective(model, batch, tower)
    point = _point(model, batch, tower, 2)
    start_cfg = PerturbConfig(tower=tower, layer=2, epsilon=0.5, steps=0, norm=norm)
    cfg = start_cfg.model_copy(update={"steps": 5})
    torch.manual_seed(3)
    start = pgd({tower: point}, objective, start_cfg)[tower]  # steps=0: the random start itself
    torch.manual_seed(3)
    final = pgd({tower: point}, objective, cfg)[tower]
    with torch.no_grad():
        loss_at = lambda d: float(objective({tower: point.finish(d)}))  # noqa: E731
        assert loss_at(final) > loss_at(start) > loss_at(None) - 0.5


def test_pgd_computes_no_parameter_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    point = _point(model, batch, "image", 0)
    cfg = PerturbConfig(layer=0, epsilon=0.2, steps=2)
    pgd({"image": point}, _objective(model, batch, "image"), cfg)
    assert all(p.grad is None for p in model.parameters())


def test_relative_epsilon_follows_the_feature_scale(model, batch):
    cfg = PerturbConfig(epsilon=0.1, epsilon_mode="relative", norm="linf")
    h = torch.randn(4, 5, 6) * torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(4, 1, 1)
    rms = h.pow(2).mean(dim=(1, 2)).sqrt()
    torch.testing.assert_close(feature_scale(h, cfg, 0).flatten(), rms)
    l2 = cfg.model_copy(update={"norm": "l2"})
    torch.testing.assert_close(feature_scale(h, l2, 0).flatten(), h.flatten(1).norm(dim=1))
    assert float(feature_scale(h, cfg.model_copy(update={"epsilon_mode": "absolute"}), 0)) == 1.0


def test_batchnorm_statistics_are_untouched_by_pgd_passes(batch):
    torch.manual_seed(0)
    rn = open_clip.create_model("clipray-tiny-rn").train()
    point = split_at(split_tower(rn, "image"), batch[0], 1)
    before = {k: v.clone() for k, v in rn.state_dict().items() if "running" in k}
    cfg = PerturbConfig(layer=1, epsilon=0.2, steps=3)
    pgd({"image": point}, _objective(rn, batch, "image"), cfg)
    after = {k: v for k, v in rn.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["pgd", "noise"])
@pytest.mark.parametrize("layer", [0, 1, 3])
def test_a_perturbed_training_step_through_batchnorm_backpropagates(batch, kind, layer):
    """A whole training step on the ResNet tower (clean pass, perturbation, perturbed pass,
    backward): it runs, and the running statistics move exactly as under the clean pass alone."""
    states = []
    for perturb in (None, PerturbConfig(kind=kind, layer=layer, epsilon=0.05, steps=2)):
        torch.manual_seed(0)
        rn = open_clip.create_model("clipray-tiny-rn").train()
        if perturb is None:
            rn.encode_image(batch[0])
        else:
            ClipTrainingLoss(rn, perturb)(*batch)["loss"].backward()
            assert all(p.grad is not None for p in rn.visual.parameters())
        states.append({k: v for k, v in rn.state_dict().items() if "running" in k})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_unknown_norm_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: linf, l2"):
        get_norm("l1")


# ---------------------------------------------------------------------- the noise control
@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_noise_control_lies_on_the_same_ball_as_pgd(model, batch, norm, mode):
    """Same norm, same radius, same layer as PGD, on the ball's boundary, with no gradient."""
    cfg = PerturbConfig(kind="noise", layer=1, epsilon=0.2, norm=norm, epsilon_mode=mode)
    point = _point(model, batch, "image", 1)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    delta = noise({"image": point}, cfg)["image"]
    radius = cfg.epsilon * feature_scale(point.hidden, cfg, 0)
    torch.testing.assert_close(get_norm(norm).measure(delta, 0), radius.expand(8, 1, 1))
    if norm == "linf":  # every element at +-radius: a corner, where sign steps take PGD
        torch.testing.assert_close(delta.abs(), radius.expand_as(delta))
    assert not delta.requires_grad and all(p.grad is None for p in model.parameters())
    torch.manual_seed(1)
    assert not torch.equal(delta, noise({"image": point}, cfg)["image"])  # random, not fixed


def test_noise_raises_the_loss_less_than_pgd_of_the_same_size(model, batch):
    """What the control is for: at the same radius, the adversary finds a worse direction."""
    objective = _objective(model, batch, "image")
    point = _point(model, batch, "image", 2)
    pgd_cfg = PerturbConfig(layer=2, epsilon=0.3, steps=3)
    noise_cfg = pgd_cfg.model_copy(update={"kind": "noise"})
    torch.manual_seed(0)
    adversarial = pgd({"image": point}, objective, pgd_cfg)["image"]
    random = noise({"image": point}, noise_cfg)["image"]
    with torch.no_grad():
        loss_at = lambda d: float(objective({"image": point.finish(d)}))  # noqa: E731
        assert loss_at(adversarial) > loss_at(random)


def test_noise_is_active_without_steps_and_the_baseline_stays_clean():
    assert PerturbConfig(kind="noise", epsilon=0.1, steps=0).active
    assert not PerturbConfig(kind="noise", epsilon=0.0).active
    assert not PerturbConfig(kind="pgd", epsilon=0.1, steps=0).active
