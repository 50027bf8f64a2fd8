"""Device, threads and precision: one decision, followed by training, validation and scoring."""

from __future__ import annotations

import pytest
import torch

from clipray.config.errors import ConfigError
from clipray.core.data import load_split
from clipray.core.device import autocast_dtype, local_device, torch_threads, wants_gpu
from clipray.core.encode import clean_retrieval, embed_images, embed_texts
from clipray.core.model import build_model
from clipray.scoring.plan import load_eval_set
from clipray.scoring.worker import ScorerWorker
from tests.conftest import small_experiment

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("device", "precision", "expected"),
    [
        ("cuda", "auto", torch.bfloat16),
        ("cuda", "bf16", torch.bfloat16),
        ("cuda", "fp32", None),  # scoring used to run bf16 here regardless
        ("cpu", "auto", None),
        ("cpu", "fp32", None),
        ("cpu", "bf16", torch.bfloat16),
    ],
)
def test_train_precision_decides_autocast_on_every_device(device, precision, expected):
    assert autocast_dtype(device, precision) is expected


@pytest.mark.parametrize(
    ("setting", "available", "expected"),
    [("auto", True, True), ("auto", False, False), ("yes", False, True), ("no", True, False)],
)
def test_use_gpu_setting(setting, available, expected):
    assert wants_gpu(setting, available) is expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_local_run_refuses_use_gpu_yes_without_a_gpu():
    assert local_device("auto") == CPU and local_device("no") == CPU
    with pytest.raises(ConfigError, match="train.use_gpu: 'yes' but no CUDA device"):
        local_device("yes")


@pytest.mark.parametrize(("cpus", "threads"), [(0.1, 1), (1.0, 1), (1.5, 2), (4, 4)])
def test_threads_round_fractional_cpus_up(cpus, threads):
    assert torch_threads(cpus) == threads


@pytest.fixture(scope="module")
def tiny():
    exp = small_experiment()
    clip = build_model(exp.model)
    clip.model.eval()
    return exp, clip, load_split(exp.data, "val")


def test_embedding_follows_the_precision_it_is_given(tiny):
    """bf16 autocast changes the embeddings (on the CPU too); auto on the CPU is exactly fp32."""
    _, clip, split = tiny
    images = split.load_all(clip.image_size)
    tokens = clip.tokenize([c[0] for c in split.captions])
    emb = {p: embed_images(clip, images, 8, CPU, p) for p in ("auto", "fp32", "bf16")}
    txt = {p: embed_texts(clip, tokens, 8, CPU, p) for p in ("auto", "fp32", "bf16")}
    assert torch.equal(emb["auto"], emb["fp32"]) and torch.equal(txt["auto"], txt["fp32"])
    assert not torch.equal(emb["bf16"], emb["fp32"]) and not torch.equal(txt["bf16"], txt["fp32"])
    assert (emb["bf16"] - emb["fp32"]).abs().max() < 0.05  # the same model, rounded


def test_validation_and_scoring_use_train_precision(tiny, tmp_path):
    """The scorer worker embeds in the precision the trial trained in, as validation does."""
    exp, clip, split = tiny
    for precision in ("fp32", "bf16"):
        e = small_experiment(f"train.precision={precision}", f"eval.cache_dir={tmp_path}")
        worker, eval_set = ScorerWorker(e.to_dict(), str(tmp_path)), load_eval_set(e)
        blob = {"config": e.to_dict(), "model": clip.model.state_dict()}
        scored = worker.embed_texts(eval_set, "request", blob)
        tokens = clip.tokenize(worker.eval.texts)
        assert torch.equal(scored, embed_texts(clip, tokens, e.eval.batch_size, CPU, precision))
    fp32 = clean_retrieval(clip, split, 8, CPU, "fp32")
    assert clean_retrieval(clip, split, 8, CPU, "auto") == fp32
