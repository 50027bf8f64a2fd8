"""The webdataset data kind: shard lists, reading and writing img2dataset shards, the streamed
training input (determinism, disjoint ranks, damaged samples, resume) and its pre-flight
checks. No Ray: the stream is the torch DataLoader path ``clipray train`` and every Ray Train
worker use."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipray.cli.main import DEFAULT_SWEEP, main
from clipray.config.loading import load_experiment
from clipray.core.data import load_split
from clipray.core.datacheck import check_dataset
from clipray.core.shards import expand_braces, iter_raw, shard_list, write_shards
from clipray.core.stream import StreamSpec, epoch_batches, epoch_shards
from clipray.core.trainer import NoHooks, build_trainer

CPU = torch.device("cpu")


def _samples(n: int, start: int = 0):
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        yield rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), [f"sample {i}"]


def _shards(tmp_path: Path, n: int = 32, per_shard: int = 8) -> list[str]:
    return [str(p) for p in write_shards(_samples(n), tmp_path / "train", per_shard)]


def _spec(shards: list[str], **kw) -> StreamSpec:
    base = dict(
        shards=shards, seed=0, rank=0, world=1, batch=4, size=16, caption_field=None,
        shuffle_buffer=5, workers=0,
    )  # fmt: skip
    return StreamSpec(**(base | kw))


def _captions(spec: StreamSpec, epoch: int, steps: int, first: int = 0) -> list[str]:
    batches = epoch_batches(spec, epoch, first, list)  # tokenize=list: captions come back
    return [c for b in itertools.islice(batches, steps - first) for c in b.tokens]


def test_brace_patterns_expand_in_order_with_padding():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("a{1..2}/{8..10}") == ["a1/8", "a1/9", "a1/10", "a2/8", "a2/9", "a2/10"]
    assert shard_list(["x.tar", "{0..1}.tar", "x.tar"]) == ["x.tar", "0.tar", "1.tar"]
    assert expand_braces("s3://b/{00..01}.tar") == ["s3://b/00.tar", "s3://b/01.tar"]
    with pytest.raises(ValueError, match="empty range"):
        expand_braces("{5..1}.tar")


def test_written_shards_have_the_img2dataset_layout(tmp_path):
    shards = _shards(tmp_path, n=10, per_shard=4)
    assert [Path(s).name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(shards[0]) as tar:
        assert tar.getnames()[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    keys = [k for s in shards for k, _ in iter_raw(s)]
    assert len(keys) == 10 and not list(tmp_path.glob("**/*.tmp"))


def test_epoch_order_is_a_function_of_seed_and_epoch(tmp_path):
    spec = _spec(_shards(tmp_path))
    a = _captions(spec, epoch=0, steps=6)
    assert a == _captions(spec, epoch=0, steps=6)
    assert a != _captions(spec, epoch=1, steps=6)
    assert a != _captions(_spec(spec.shards, seed=1), epoch=0, steps=6)
    assert a[8:] == _captions(spec, epoch=0, steps=6, first=2)  # mid-epoch resume: replayed
    two = _spec(spec.shards, workers=2)  # decode processes: deterministic too
    assert _captions(two, 0, 6) == _captions(two, 0, 6)


def test_ranks_read_disjoint_shards_of_each_epoch(tmp_path):
    shards = _shards(tmp_path, n=32, per_shard=8)
    for epoch in (0, 1):
        seen = [_captions(_spec(shards, rank=r, world=2), epoch, steps=4) for r in (0, 1)]
        assert len(set(seen[0])) == len(set(seen[1])) == 16  # one pass: each sample once
        assert not set(seen[0]) & set(seen[1])
    assert sorted(epoch_shards(shards, 0, 0, 0)) == sorted(shards)


def _damaged_shard(path: Path) -> str:
    good = [(np.zeros((20, 20, 3), np.uint8), [f"ok {i}"]) for i in range(6)]
    tmp = write_shards(good, path.parent / "d", 100)[0]
    with tarfile.open(tmp) as src, tarfile.open(path, "w") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()
            if info.name == "000000001.jpg":
                data = b"not a jpeg"
            if info.name in ("000000002.txt", "000000002.json"):
                continue  # no caption
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return str(path)


def test_damaged_samples_are_skipped_and_counted(tmp_path):
    shard = _damaged_shard(tmp_path / "bad.tar")
    batches = list(itertools.islice(epoch_batches(_spec([shard], batch=4), 0, 0, list), 1))
    assert batches[0].skipped == 2
    assert all(c.startswith("ok") for c in batches[0].tokens)


def _wd(tmp_path: Path, *over: str):
    out = tmp_path / "ds"
    if not out.exists():
        assert main(["data", "--format", "webdataset", "--per-shard", "16", "--out", str(out),
                     *[a for o in TINY_DATA for a in ("--set", o)]]) == 0  # fmt: skip
    return load_experiment(
        None,
        [
            "train.batch_size=16",
            "train.warmup_steps=2",
            "train.epochs=1",
            "data.kind=webdataset",
            f"data.train={out}/train/{{00000..00003}}.tar",
            "data.train_samples=64",
            f"data.val={out}/val/00000.tar",
            f"data.test={out}/test/00000.tar",
            "data.loader_workers=0",
            "data.shuffle_buffer=8",
            *over,
        ],
    )


TINY_DATA = ("data.train_size=64", "data.val_size=16", "data.test_size=16")


def test_data_command_writes_shards_that_read_back(tmp_path):
    exp = _wd(tmp_path)
    test = load_split(exp.data, "test")
    ref = load_split(load_experiment(DEFAULT_SWEEP, list(TINY_DATA)).data, "test")  # what it wrote
    assert test.captions == ref.captions  # every caption, through the .json
    # Pixels: the writer's JPEG (quality 95) of each image, decoded; nothing else changed them.
    expected = np.stack([_jpeg_round_trip(image) for image in ref.load_all(64)])
    assert np.abs(test.load_all(64).astype(int) - expected).max() <= 1


def _jpeg_round_trip(image: np.ndarray, quality: int = 95) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB")).astype(int)


def test_training_streams_and_resumes_mid_epoch_exactly(tmp_path):
    over = ("train.epochs=2", "train.checkpoint_every_steps=3", "data.loader_workers=2")
    straight = build_trainer(_wd(tmp_path, *over), CPU)
    blobs = []

    class Keep(NoHooks):
        def on_checkpoint(self, metrics, blob):
            blobs.append((metrics, blob))
            return False

    straight.fit(Keep())
    metrics = blobs[-1][0]
    assert metrics["data/skipped"] == 0 and 0 <= metrics["time/data_wait_fraction"] <= 1
    mid = next(b for m, b in blobs if b["step"] == 3)  # inside epoch 0 (4 steps per epoch)
    resumed = build_trainer(_wd(tmp_path, *over), CPU, resume=mid)
    resumed.fit(NoHooks())
    a, b = straight.clip.model.state_dict(), resumed.clip.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_past_the_skip_threshold_stops_with_one_line(tmp_path):
    exp = _wd(tmp_path)
    shard = _damaged_shard(tmp_path / "bad.tar")
    exp = _wd(tmp_path, f"data.train={shard}", "data.train_samples=4", "train.batch_size=4")
    with pytest.raises(ValueError, match=r"data.max_skip_fraction: 2 of 6 training samples"):
        build_trainer(exp, CPU).fit(NoHooks())


@pytest.mark.parametrize(
    "train, message",
    [
        ("{root}/missing/{{0..1}}.tar", "data.train: shard not found: .*missing/0.tar"),
        ("{root}/notatar.tar", "data.train: .*notatar.tar: not a readable tar"),
        ("{root}/empty.tar", "data.train: .*empty.tar: no samples in this shard"),
        ("{root}/e/{{5..1}}.tar", "data.train: .*empty range"),
    ],
    ids=["missing", "not-a-tar", "empty-tar", "empty-range"],
)
def test_bad_shard_lists_are_one_line_before_training(tmp_path, capsys, train, message):
    exp = _wd(tmp_path)
    (tmp_path / "notatar.tar").write_bytes(b"hello, not a tar" * 100)
    tarfile.open(tmp_path / "empty.tar", "w").close()
    bad = train.format(root=tmp_path)
    with pytest.raises(ValueError, match=message):
        check_dataset(_wd(tmp_path, f"data.train={bad}"))
    out = tmp_path / "run"
    over = [*_cli_overrides(exp), f"data.train={bad}"]
    code = main(["train", "--quiet", "--out", str(out), *[a for o in over for a in ("--set", o)]])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.count("\n") == 1


def _cli_overrides(exp) -> list[str]:
    d = exp.data
    return [
        "data.kind=webdataset", "data.train_samples=64", f"data.val={d.val}",
        f"data.test={d.test}", "data.loader_workers=0", "train.epochs=1",
    ]  # fmt: skip


def test_remote_shards_are_checked_offline_only_for_their_form(tmp_path):
    exp = _wd(tmp_path, "data.train=s3://no-such-bucket/cc3m/{00000..00311}.tar")
    check_dataset(exp, remote=False)  # clipray check: no bucket reached
    assert exp.data.train == "s3://no-such-bucket/cc3m/{00000..00311}.tar"  # not made a path
    with pytest.raises(ValueError, match="data.train: ranks|each rank needs"):
        check_dataset(_wd(tmp_path, f"data.train={exp.data.val}", "train.num_workers=2"))


def test_data_command_refuses_to_overwrite_shards_and_bad_sizes(tmp_path, capsys):
    _wd(tmp_path)  # writes tmp_path/ds
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "ds").rglob("*.tar"))
    again = ["data", "--format", "webdataset", "--out", str(tmp_path / "ds")]
    assert main(again) == 2
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "ds").rglob("*.tar")) == before
    bad = ["data", "--format", "webdataset", "--per-shard", "0", "--out", str(tmp_path / "x")]
    assert main(bad) == 2 and not (tmp_path / "x").exists()
    assert capsys.readouterr().err.count("clipray: error:") == 2


def test_ray_data_decode_cpus_count_for_every_concurrent_trial(tmp_path):
    from clipray.config.errors import ConfigError
    from clipray.sweep.runtime import check_resources

    over = ("train.num_workers=2", "data.loader_workers=3", "sweep.max_concurrent_trials=2")
    exp = _wd(tmp_path, *over)  # pool 1 + 2 trials x (0.1 + 2 x (1 + 3)) = 17.2
    with pytest.raises(ConfigError, match=r"2 trials \(0.1 \+ 2 x 1 CPU \+ 2 x 3 for Ray Data"):
        check_resources(exp, {"CPU": 17.0}, local=True)
    check_resources(exp, {"CPU": 17.2}, local=True)
    processes = _wd(tmp_path, *over, "data.ingest=processes")  # inside the workers: one trial
    check_resources(processes, {"CPU": 3.1}, local=True)
