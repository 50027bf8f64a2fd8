"""Splitting a tower at any block reproduces open_clip's own forward exactly."""

from __future__ import annotations

import open_clip
import pytest
import torch

from clipray.config.architectures import BUNDLED_MODELS  # noqa: F401  (registers the bundled configs)
from clipray.core.towers import split_tower


def _model(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model(name, **kw).eval()


CASES = [
    ("clipray-tiny-vit", "image", {}),
    ("clipray-tiny-vit", "text", {}),
    ("clipray-tiny-rn", "image", {}),
    ("clipray-tiny-vit", "text", {"force_custom_text": True}),  # CustomTextCLIP.text
]


def _inputs(model: torch.nn.Module, tower: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if tower == "image":
        return torch.randn(3, 3, 64, 64, generator=g)
    tokens = torch.randint(1, 1000, (3, model.context_length), generator=g)
    tokens[:, 10:] = 0  # padding after an end-of-text token, as the tokenizer produces
    tokens[:, 9] = 49407
    return tokens


@pytest.mark.parametrize(("name", "tower", "kw"), CASES, ids=lambda c: str(c))
def test_split_at_every_block_equals_unsplit_forward(name, tower, kw):
    model = _model(name, **kw)
    x = _inputs(model, tower)
    reference = model.encode_image(x) if tower == "image" else model.encode_text(x)
    split = split_tower(model, tower)
    assert split.depth > 1
    assert torch.equal(split.forward(x), reference)
    for layer in range(split.depth):
        h, ctx = split.embed(x)
        h = split.run(h, ctx, 0, layer + 1)
        h = h + torch.zeros_like(h)  # delta = 0
        out = split.head(split.run(h, ctx, layer + 1, split.depth), ctx)
        assert torch.equal(out, reference), f"layer {layer}"


@pytest.mark.parametrize(("name", "tower", "kw"), CASES, ids=lambda c: str(c))
def test_gradient_reaches_every_parameter_of_the_tower(name, tower, kw):
    model = _model(name, **kw).train()
    with torch.no_grad():  # open_clip zero-inits ResNet bn3 gains, which blocks branch gradients
        for pname, p in model.named_parameters():
            if pname.endswith("bn3.weight"):
                p.fill_(1.0)
    split = split_tower(model, tower)
    split.forward(_inputs(model, tower)).square().sum().backward()
    params = [p for m in split.modules for p in m.parameters()]
    assert params
    missing = [p.shape for p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_unknown_tower_is_rejected():
    model = _model("clipray-tiny-vit")
    with pytest.raises(ValueError, match="unknown tower 'audio'"):
        split_tower(model, "audio")
