"""Models: open_clip architectures by name, bundled tiny configs, local checkpoints, no download."""

from __future__ import annotations

import copy
import socket

import numpy as np
import open_clip
import pytest
import torch
from torch import nn

from clipray.config.architectures import BUNDLED_MODELS, image_size, tower_depths
from clipray.config.schema import ModelConfig
from clipray.core.checkpoint import FORMAT, load_state, read_weights
from clipray.core.model import ClipModel, build_model, to_uint8_nhwc


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Nothing in this layer may download: any connection attempt fails the test. Module-wide,
    so the models built by module fixtures are covered too."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def models() -> dict[str, ClipModel]:
    """Each bundled model built once for the module (seeded, so runs are comparable)."""
    out = {}
    for name in BUNDLED_MODELS:
        torch.manual_seed(0)
        out[name] = build_model(ModelConfig(name=name))
    return out


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ architectures
def test_bundled_models_have_clear_names_and_are_registered_with_open_clip():
    assert BUNDLED_MODELS == (
        "clipray-small-vit",
        "clipray-tiny-rn",
        "clipray-tiny-rn-gn",
        "clipray-tiny-vit",
    )
    for name in BUNDLED_MODELS:
        assert name in open_clip.list_models()


def test_the_group_norm_resnet_normalises_each_image_on_its_own(models):
    """clipray-tiny-rn-gn: a GroupNorm wherever the BatchNorm twin has a BatchNorm, and so, even
    in training mode, an image's embedding does not depend on the rest of its batch."""
    batchnorm = copy.deepcopy(models["clipray-tiny-rn"].model)  # train mode moves BN statistics
    groupnorm = copy.deepcopy(models["clipray-tiny-rn-gn"].model)
    bn = {n: m for n, m in batchnorm.visual.named_modules() if isinstance(m, nn.BatchNorm2d)}
    gn = {n: m for n, m in groupnorm.visual.named_modules() if isinstance(m, nn.GroupNorm)}
    assert bn and gn.keys() == bn.keys()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in groupnorm.modules())
    for name, m in gn.items():  # >= 4 channels a group, at most 8 groups
        assert m.num_channels == bn[name].num_features
        assert m.num_groups == min(8, m.num_channels // 4)
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for model, per_image in ((groupnorm, True), (batchnorm, False)):
        model.train()
        with torch.no_grad():
            together = model.encode_image(images)[:2]
            alone = model.encode_image(images[:2])
        assert torch.allclose(together, alone, atol=1e-5) is per_image
    # Its weights are not the BatchNorm twin's: a checkpoint of one does not load into the other.
    with pytest.raises(ValueError, match="does not fit clipray-tiny-rn"):
        load_state(batchnorm, groupnorm.state_dict(), "weights", "clipray-tiny-rn")


def test_depths_of_standard_architectures_are_read_without_building_them(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("tower_depths must not build a model")

    monkeypatch.setattr(open_clip, "create_model", no_build)
    assert tower_depths("ViT-B-32") == {"image": 12, "text": 12}
    assert tower_depths("RN50") == {"image": 3 + 4 + 6 + 3, "text": 12}  # bottleneck blocks
    assert tower_depths("ViT-L-14") == {"image": 24, "text": 12}
    assert image_size("ViT-B-32") == 224 and image_size("RN50") == 224


@pytest.mark.parametrize("name", open_clip.list_models())
def test_every_open_clip_architecture_has_depths_or_a_clear_refusal(name):
    try:
        depths = tower_depths(name)
    except ValueError as e:
        assert str(e).startswith(f"model.name: {name!r} uses a timm/Hugging Face tower")
        return
    assert set(depths) == {"image", "text"}
    assert all(isinstance(d, int) and d > 0 for d in depths.values())


def test_an_unknown_name_lists_the_bundled_models():
    with pytest.raises(ValueError) as err:
        tower_depths("ViT-Nope")
    message = str(err.value)
    assert message.startswith("model.name: unknown model 'ViT-Nope'; known: ")
    assert all(name in message for name in BUNDLED_MODELS)
    assert "\n" not in message
    with pytest.raises(ValueError, match="unknown model 'ViT-Nope'"):
        build_model(ModelConfig(name="ViT-Nope"))


def _blocks(model: torch.nn.Module) -> dict[str, int]:
    """Independent count of the built towers' blocks."""
    visual = model.visual
    if hasattr(visual, "transformer"):
        image = len(visual.transformer.resblocks)
    else:  # ModifiedResNet: layer1..layer4 of bottleneck blocks
        image = sum(len(getattr(visual, f"layer{i}")) for i in range(1, 5))
    return {"image": image, "text": len(model.transformer.resblocks)}


@pytest.mark.parametrize("name", BUNDLED_MODELS)
def test_bundled_models_build_and_match_their_declared_depths(models, name):
    clip = models[name]
    assert _blocks(clip.model) == tower_depths(name)
    assert clip.image_size == image_size(name) == 64
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    tokens = clip.tokenize(["a red circle", "two blue squares on a gray background", "x"])
    assert tokens.shape == (3, clip.model.context_length) and tokens.dtype == torch.long
    clip.model.eval()
    with torch.no_grad():
        img = clip.model.encode_image(clip.normalize(images))
        txt = clip.model.encode_text(tokens)
    assert img.shape == txt.shape == (3, clip.model.text_projection.shape[1])
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_tiny_models_are_small_enough_for_cpu(models):
    sizes = {n: sum(p.numel() for p in m.model.parameters()) for n, m in models.items()}
    assert sizes["clipray-tiny-vit"] < sizes["clipray-small-vit"] < 20_000_000
    assert max(sizes.values()) < 20_000_000


def test_building_is_deterministic_under_a_seed():
    torch.manual_seed(3)
    a = build_model(ModelConfig())
    torch.manual_seed(3)
    b = build_model(ModelConfig())
    assert _same(_state(a.model), _state(b.model))


# -------------------------------------------------------------------------------- input path
def test_normalize_matches_a_numpy_reference(models):
    clip = models["clipray-tiny-vit"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    ref = (images.astype(np.float64) / 255.0 - np.array(clip.mean)) / np.array(clip.std)
    out = clip.normalize(torch.from_numpy(images))
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    assert out.is_contiguous()  # NCHW as the model's patch embedding expects
    np.testing.assert_allclose(out.numpy(), ref.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)
    assert clip.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert clip.std == pytest.approx(open_clip.OPENAI_DATASET_STD)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 8, 8, 3), np.float32),
        np.zeros((8, 8, 3), np.uint8),
        np.zeros((2, 3, 8, 8), np.uint8),
    ],
    ids=["float", "no-batch", "nchw"],
)
def test_to_uint8_nhwc_rejects_other_layouts(bad):
    with pytest.raises(ValueError, match=r"^images: expected uint8 NxHxWx3, got "):
        to_uint8_nhwc(bad)
    assert to_uint8_nhwc(np.zeros((1, 8, 8, 3), np.uint8)).shape == (1, 8, 8, 3)


# ------------------------------------------------------------------------------- checkpoints
def test_a_clipray_training_checkpoint_loads(tiny_checkpoint):
    """A real clipray training checkpoint (the session's tiny one) gives the trained weights."""
    path, blob = tiny_checkpoint
    assert torch.load(path, weights_only=True)["format"] == FORMAT
    torch.manual_seed(99)  # a different init: only the file can make the weights equal
    clip = build_model(ModelConfig(pretrained=str(path)))
    assert _same(_state(clip.model), blob["model"])


@pytest.mark.parametrize("layout", ["plain", "open_clip-train", "ddp-prefixed"])
def test_a_plain_open_clip_state_dict_file_loads(models, tmp_path, layout):
    source = _state(models["clipray-tiny-vit"].model)
    if layout == "plain":
        blob = source
    elif layout == "open_clip-train":  # open_clip's training script: epoch, name, state_dict
        blob = {"epoch": 3, "name": "x", "state_dict": source}
    else:
        blob = {"state_dict": {f"module.{k}": v for k, v in source.items()}}
    path = tmp_path / "weights.pt"
    torch.save(blob, path)
    torch.manual_seed(99)
    clip = build_model(ModelConfig(pretrained=str(path)))
    assert _same(_state(clip.model), source)


@pytest.mark.parametrize("other", ["clipray-tiny-rn", "clipray-small-vit"])
def test_a_checkpoint_for_another_architecture_fails_clearly(models, tmp_path, other):
    path = tmp_path / f"{other}.pt"
    torch.save(models[other].model.state_dict(), path)
    with pytest.raises(ValueError) as err:
        build_model(ModelConfig(pretrained=str(path)))
    message = str(err.value)
    assert message.startswith(f"checkpoint {path}: does not fit clipray-tiny-vit")
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["truncated", "text", "tensor"])
def test_a_damaged_checkpoint_fails_clearly(tiny_checkpoint, tmp_path, damage):
    path = tmp_path / "bad.pt"
    if damage == "truncated":
        data = tiny_checkpoint.path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expected = "cannot be read"
    elif damage == "text":
        path.write_text("not a checkpoint\n")
        expected = "cannot be read"
    else:
        torch.save(torch.zeros(3), path)
        expected = "no state dict inside"
    with pytest.raises(ValueError) as err:
        read_weights(path)
    assert str(err.value).startswith(f"checkpoint {path}: {expected}")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=expected):
        build_model(ModelConfig(pretrained=str(path)))


def test_read_weights_names_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint .*missing\.pt: file not found"):
        read_weights(tmp_path / "missing.pt")


def test_a_pretrained_file_that_does_not_exist_fails_clearly(tmp_path):
    """A path-like ``pretrained`` that is not there must say so (ValueError: exit code 2), not
    fall through to open_clip's tag lookup (RuntimeError: a traceback)."""
    missing = tmp_path / "weights.pt"
    with pytest.raises(ValueError, match="not found") as err:
        build_model(ModelConfig(pretrained=str(missing)))
    assert str(missing) in str(err.value) and "model.pretrained" in str(err.value)
