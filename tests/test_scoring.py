"""Scoring pool: pure planning against brute force, and real Ray actors on real tiny models.

The Ray tests (marked slow) share one runtime, two checkpoints of the tiny CLIP (untrained, and
the session's trained one), one cache directory and two pools (1 actor with a cold cache, then 2
actors over the same cache), so every actor start (seconds on this machine) is paid once.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
from pathlib import Path

import pytest
import ray
import torch

from clipray.cli.main import main
from clipray.config.schema import ModelConfig
from clipray.core.checkpoint import load_state, read_weights, save_checkpoint
from clipray.core.data import load_split
from clipray.core.encode import embed_images, embed_texts
from clipray.core.metrics import (
    cell_key,
    clean_key,
    corruption_summary,
    flatten_cell_metrics,
    flatten_clean,
    flatten_summary,
    retrieval_recall,
)
from clipray.core.model import build_model
from clipray.core.trainer import build_trainer
from clipray.scoring import corruptions as C
from clipray.scoring import plan as P
from clipray.scoring.corruptions import corrupt_batch
from clipray.scoring.pool import ScorerPool
from tests.conftest import small_experiment

CPU = torch.device("cpu")
CORRUPTIONS, SEVERITIES = ("zoom_blur", "gaussian_noise"), (1, 3)
N_CELLS = 1 + len(CORRUPTIONS) * len(SEVERITIES)
POOL = "test-scoring-pool"


def eval_overrides(cache: Path) -> list[str]:
    """16 eval images, 2 corruptions x 2 severities; half a CPU per actor so that the two pools
    and the command's pool fit together in a 2-CPU runtime."""
    return [
        "data.test_size=24",  # not TINY's 16: more than eval.max_images, so a subset is scored
        "eval.max_images=16",
        f"eval.corruptions={list(CORRUPTIONS)}",
        f"eval.severities={list(SEVERITIES)}",
        "eval.batch_size=6",  # several batches per cell
        "eval.scorers.num_actors=1",
        "eval.scorers.cpus_per_actor=0.5",
        f"eval.cache_dir={cache}",
    ]


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# ------------------------------------------------------------------------------ pure planning
@pytest.mark.parametrize("name", list(C.REGISTRY))
def test_every_corruption_has_a_build_cost(name):
    assert P.BUILD_COST[name] > 0
    assert set(P.BUILD_COST) == set(C.REGISTRY)


def test_eval_cells_clean_first_then_config_order():
    exp = small_experiment("eval.corruptions=[fog, extra]", "eval.severities=[5, 1]")
    cells = P.eval_cells(exp.eval)
    assert cells[0] == P.CLEAN
    assert cells[1:] == [(c, s) for c in ("fog", *C.GROUPS["extra"]) for s in (1, 5)]
    with pytest.raises(ValueError, match="eval.corruptions: expected at least one"):
        small_experiment("eval.corruptions=[]")


def optimal_makespan(costs: list[float], n: int, cap: int) -> float:
    """Brute force over every assignment with at most ``cap`` cells per actor."""
    best = math.inf
    for assignment in itertools.product(range(n), repeat=len(costs)):
        if max(assignment.count(k) for k in range(n)) <= cap:
            loads = [0.0] * n
            for cost, k in zip(costs, assignment, strict=True):
                loads[k] += cost
            best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_assignment_is_a_balanced_partition_near_the_optimum(seed):
    rng = random.Random(seed)
    n_cells, n = rng.randint(1, 8), rng.randint(1, 3)
    cells = [(f"c{i}", rng.randint(1, 5)) for i in range(n_cells)]
    costs = {cell: float(rng.randint(0, 9)) for cell in cells}
    shards = P.assign_cells(cells, n, costs.__getitem__)
    assert len(shards) == n
    assert sorted(c for s in shards for c in s) == sorted(cells)  # every cell exactly once
    cap = math.ceil(n_cells / n)
    assert max(map(len, shards)) <= cap
    assert all(s == [c for c in cells if c in s] for s in shards)  # input order kept
    makespan = max(sum(costs[c] for c in s) for s in shards)
    assert makespan <= 4 / 3 * optimal_makespan(list(costs.values()), n, cap) + 1e-9


def test_assignment_is_deterministic_and_independent_of_input_order():
    cells = P.eval_cells(small_experiment("eval.corruptions=[all]").eval)
    shards = P.assign_cells(cells, 3)
    shuffled = cells[:]
    random.Random(0).shuffle(shuffled)
    again = P.assign_cells(shuffled, 3)
    assert [sorted(s) for s in again] == [sorted(s) for s in shards]
    assert P.assign_cells(cells, 3) == shards


@pytest.mark.parametrize("n", [2, 3, 4])
def test_default_sweep_cells_split_evenly_in_count_and_build_cost(n):
    cells = P.eval_cells(small_experiment("eval.severities=[1, 3, 5]").eval)
    shards = P.assign_cells(cells, n)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    loads = [sum(map(P.cell_cost, s)) for s in shards]
    lower_bound = max(sum(loads) / n, max(map(P.cell_cost, cells)))
    assert max(loads) <= 1.1 * lower_bound
    cap = math.ceil(len(cells) / n)
    naive = [cells[k * cap : (k + 1) * cap] for k in range(n)]  # contiguous blocks
    assert max(loads) < 0.8 * max(sum(map(P.cell_cost, s)) for s in naive)


@pytest.mark.parametrize(
    "cells, n, match",
    [
        ([P.CLEAN], 0, "n_actors"),
        ([P.CLEAN], True, "n_actors"),
        ([P.CLEAN, P.CLEAN], 2, "distinct"),
    ],
)
def test_assignment_rejects_bad_input(cells, n, match):
    with pytest.raises(ValueError, match=match):
        P.assign_cells(cells, n)


def fake_flat(clean: float, cells: dict) -> dict:
    return flatten_clean({"rsum": clean}) | flatten_cell_metrics(
        {cell: {"rsum": r} for cell, r in cells.items()}
    )


def test_with_reference_adds_ce_by_the_imagenet_c_formulas():
    model = fake_flat(500.0, {("fog", 1): 450.0, ("fog", 3): 300.0, ("snow", 1): 420.0})
    ref = fake_flat(480.0, {("fog", 1): 400.0, ("fog", 3): 240.0, ("snow", 1): 420.0})
    out = P.with_reference(model, ref)

    def err(r):
        return 1 - r / 600

    ce_fog = 100 * (err(450) + err(300)) / (err(400) + err(240))
    rel_fog = 100 * (err(450) + err(300) - 2 * err(500)) / (err(400) + err(240) - 2 * err(480))
    rel_snow = 100 * (err(420) - err(500)) / (err(420) - err(480))
    assert out["agg/ce/fog"] == pytest.approx(ce_fog)
    assert out["agg/ce/snow"] == pytest.approx(100.0)
    assert out["agg/mce"] == pytest.approx((ce_fog + 100) / 2)
    assert out["agg/relative_mce"] == pytest.approx((rel_fog + rel_snow) / 2)
    assert out["agg/mean_corrupted_rsum"] == pytest.approx((450 + 300 + 420) / 3)
    assert {k: v for k, v in out.items() if not k.startswith("agg/")} == model
    assert P.with_reference(ref, ref)["agg/mce"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="reference cells"):
        P.with_reference(model, fake_flat(480.0, {("fog", 1): 400.0}))
    with pytest.raises(ValueError, match="clean/rsum"):
        P.with_reference({}, ref)


def tiny_blob(name: str, config_name: str | None = None) -> dict:
    config = small_experiment().to_dict()
    config["model"]["name"] = config_name or name
    return {"config": config, "model": build_model(ModelConfig(name=name)).model.state_dict()}


@pytest.mark.parametrize(
    "blob, match",
    [
        ("not a dict", "expected a checkpoint dict"),
        ({"model": {}}, "no experiment config"),
        ({"model": {}, "config": {"model": {"name": "nope"}}}, "unknown model 'nope'"),
        (lambda: tiny_blob("clipray-tiny-rn"), "model 'clipray-tiny-rn' .* does not match"),
        (lambda: tiny_blob("clipray-tiny-rn", "clipray-tiny-vit"), "does not fit"),
    ],
)
def test_foreign_weights_are_rejected_in_one_line(blob, match):
    with pytest.raises(ValueError, match=match) as info:
        P.build_weights_model(blob() if callable(blob) else blob, "clipray-tiny-vit")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scoring-cache")


def _training_part(config: dict) -> dict:
    """An experiment dict without what only scoring reads: the eval section, the test split."""
    return {**config, "eval": None, "data": {**config["data"], "test_size": None}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, cache_dir, tiny_checkpoint) -> dict:
    """Two checkpoints of one tiny model, files and blobs: as built ("initial") and the session's
    trained one. Both carry this module's eval settings in their config, which ``clipray score``
    reads from the checkpoint; nothing else differs from the config the model was trained with."""
    out = tmp_path_factory.mktemp("checkpoints")
    exp = small_experiment(*eval_overrides(cache_dir))
    trained = tiny_checkpoint.blob
    assert _training_part(trained["config"]) == _training_part(exp.to_dict())
    blobs = {
        "initial": build_trainer(exp, CPU).state_dict(),
        "trained": {**trained, "config": exp.to_dict()},
    }
    for name, blob in blobs.items():
        save_checkpoint(out / f"{name}.pt", blob)
    return {"exp": exp, "blobs": blobs, "files": {n: out / f"{n}.pt" for n in blobs}}


@pytest.fixture(scope="module")
def first_run(ray_runtime, checkpoints):
    """One actor, cold cache: ready() builds every cell; then it scores the trained model."""
    pool = ScorerPool.create(checkpoints["exp"])
    info = pool.ready()
    flat = pool.score(checkpoints["blobs"]["trained"])
    pool.shutdown()
    return info, flat


@pytest.fixture(scope="module")
def pool_two(ray_runtime, checkpoints, first_run):
    """Two actors over the cache the first pool built, as a named pool."""
    cache = Path(checkpoints["exp"].eval.cache_dir)
    exp = small_experiment(*eval_overrides(cache), "eval.scorers.num_actors=2")
    pool = ScorerPool.create(exp, name=POOL)
    yield pool, pool.ready()
    pool.shutdown()


def direct_result(checkpoints: dict) -> dict:
    """The same numbers computed in this process without the pool, the cache or Ray."""
    exp = checkpoints["exp"]
    split = load_split(exp.data, "test").subset(16)
    clip = build_model(exp.model)
    load_state(clip.model, read_weights(checkpoints["files"]["trained"]), "test", "tiny")
    clip.model.eval()
    texts, owner = split.flat_captions()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in an actor with half a CPU: same float reductions
    try:
        text_emb = embed_texts(clip, clip.tokenize(texts), 6, CPU, exp.train.precision)
        images = split.load_all(64)

        def recall(batch):
            emb = embed_images(clip, batch, 6, CPU, exp.train.precision)
            return retrieval_recall(emb, text_emb, owner)

        clean = recall(images)
        cells = {
            (c, s): recall(corrupt_batch(images, c, s, exp.eval.seed))
            for c in CORRUPTIONS
            for s in SEVERITIES
        }
    finally:
        torch.set_num_threads(threads)
    summary = corruption_summary(clean, cells)
    return flatten_clean(clean) | flatten_cell_metrics(cells) | flatten_summary(summary)


# ------------------------------------------------------------------------------ Ray tests
@pytest.mark.slow
def test_pool_result_equals_a_direct_computation(first_run, checkpoints, cache_dir):
    info, flat = first_run
    assert (info["cells"], info["actors"], info["builds"], info["hits"]) == (N_CELLS, 1, 4, 0)
    assert len(files_under(cache_dir)) == 4
    assert flat == direct_result(checkpoints)
    assert list(flat)[:7] == [
        clean_key(m) for m in ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "rsum")
    ]
    assert cell_key("zoom_blur", 3, "rsum") in flat and "agg/mmi" in flat


@pytest.mark.slow
def test_two_actors_give_identical_results_and_build_nothing(first_run, pool_two, checkpoints):
    pool, info = pool_two
    assert info["actors"] == 2 and sorted(map(len, info["shards"])) == [2, 3]
    assert (info["builds"], info["hits"]) == (0, 4)
    assert pool.score(checkpoints["blobs"]["trained"]) == first_run[1]


@pytest.mark.slow
def test_captions_embedded_once_per_checkpoint_and_no_corruption_work(pool_two, checkpoints):
    pool, _ = pool_two
    before = pool.stats()
    results = [pool.score(checkpoints["blobs"][n]) for n in ("initial", "trained", "initial")]
    after = pool.stats()
    assert results[0] == results[2] != results[1]
    assert after["text_embeds"] - before["text_embeds"] == 3
    assert after["checkpoint_loads"] - before["checkpoint_loads"] == 3 * 2  # once per actor
    assert after["cells_scored"] - before["cells_scored"] == 3 * N_CELLS
    assert (after["builds"], after["hits"]) == (0, 4)


@pytest.mark.slow
def test_named_pool_serves_concurrent_callers_in_other_processes(pool_two, checkpoints):
    pool, _ = pool_two
    expected = pool.score(checkpoints["blobs"]["initial"])

    @ray.remote(num_cpus=0)
    def trial(name, weights_box):
        return ScorerPool.lookup(name).score(weights_box[0])

    ref = ray.put(checkpoints["blobs"]["initial"])
    remote = [trial.remote(POOL, [ref]) for _ in range(2)]
    local = pool.score_async(ref)
    assert ray.get(remote) == [expected, expected] and ray.get(local) == expected


@pytest.mark.slow
def test_a_crashed_worker_is_restarted_by_ray_and_the_result_is_identical(pool_two, checkpoints):
    """A worker process that dies (SIGKILL: a crash, an OOM kill) is restarted by Ray, and the
    calls it had in flight are retried on the new process; its cells come from the cache."""
    pool, _ = pool_two
    weights = checkpoints["blobs"]["trained"]
    expected = pool.score(weights)
    workers = pool.workers()
    pids = ray.get([w.pid.remote() for w in workers])
    pending = pool.score_async(weights)
    os.kill(pids[0], signal.SIGKILL)  # while the request is in flight
    assert ray.get(pending) == expected
    os.kill(pids[1], signal.SIGKILL)  # between requests
    assert pool.score(weights) == expected
    after = pool.stats()
    assert after["actors"] == 2
    assert set(ray.get([w.pid.remote() for w in workers])).isdisjoint(pids)  # new processes
    assert after["builds"] == 0  # the restarted workers loaded their cells from the cache


@pytest.mark.slow
def test_pool_rejects_foreign_weights_in_one_line(pool_two):
    pool, _ = pool_two
    for blob, match in (
        (tiny_blob("clipray-tiny-rn", "clipray-tiny-vit"), "does not fit clipray-tiny-vit"),
        (tiny_blob("clipray-tiny-rn"), "does not match the pool's model"),
        ({"model": {}}, "no experiment config"),
    ):
        with pytest.raises(ValueError, match=match) as info:
            pool.score(blob)
        assert "\n" not in str(info.value)


@pytest.mark.slow
def test_score_command_end_to_end(first_run, checkpoints, capsys, tmp_path):
    out = tmp_path / "result.json"
    path = str(checkpoints["files"]["trained"])
    assert main(["score", path, "--json", str(out), "--actors", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert json.loads(out.read_text()) == first_run[1]
    assert "| zoom_blur |" in captured.out and "clean/rsum" in captured.out
    assert "built 0, loaded from cache 4" in captured.err
    assert ray.is_initialized()  # a runtime it did not start is left running
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left


# ------------------------------------------------------------------------------ bad input
def empty_split_file(tmp_path: Path) -> Path:
    """An experiment whose CSV test table has a header and no rows."""
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "train.csv").write_text("filepath,caption\na.png,a black square\n")
    (tmp_path / "empty.csv").write_text("filepath,caption\n")
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  kind: csv\n  train: train.csv\n  val: train.csv\n  test: empty.csv\n")
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("unknown corruption", "unknown corruption 'smudge'; known corruptions: gaussian_noise"),
        ("severity", "eval.severities: expected a non-empty list of integers 1-5, got [6]"),
        ("missing", "file not found"),
        ("truncated", "cannot be read"),
        ("architecture", "does not fit clipray-tiny-vit"),
        ("empty split", "the test split is empty"),
    ],
)
def test_score_command_bad_input_is_one_line_exit_2_and_writes_nothing(
    case, match, tiny_checkpoint, tmp_path, capsys
):
    cache = tmp_path / "cache"
    ckpt = str(tiny_checkpoint.path)
    args = {
        "unknown corruption": [ckpt, "--corruptions", "fog", "smudge"],
        "severity": [ckpt, "--severities", "1", "6"],
        "missing": [str(tmp_path / "nope.pt")],
        "truncated": [str(tmp_path / "cut.pt")],
        "architecture": [str(tmp_path / "rn.pt")],
        "empty split": [ckpt, str(empty_split_file(tmp_path))],
    }[case]
    data = tiny_checkpoint.path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    save_checkpoint(
        tmp_path / "rn.pt", {**tiny_checkpoint.blob, "model": tiny_blob("clipray-tiny-rn")["model"]}
    )
    was_up = ray.is_initialized()
    assert main(["score", *args, "--set", f"eval.cache_dir={cache}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clipray: error: ") and match in err
    assert files_under(cache) == []
    assert ray.is_initialized() == was_up  # validated before any Ray runtime was started
