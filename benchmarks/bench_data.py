"""Streaming training input from WebDataset shards, measured side by side in one run.

1. Loader alone, one decode CPU: images/s of clipray's stream (read the tar, decode the JPEG,
   resize + centre-crop, shuffle buffer, tokenize, batch) against a plain loop over the same
   224 px JPEG shards (tarfile + PIL decode + the same resize) on the calling thread: the stream
   on the calling thread (captions tokenized or not: the loop does not tokenize), in one decode
   process, and in one Ray Data task.
2. Training from those shards (one decode process, or one Ray Data decode task; the training
   thread with one torch thread) against the same Trainer fed the same images from in-memory
   arrays (one torch thread): samples/s and the share of step time the training thread waited
   for its next batch, per epoch. The model (clipray-small-vit at batch 64) costs more per step
   than decoding its batch.
   Beside it, the tokenizer alone: open_clip's against clipray's (the same ids), per caption.
3. On paper: decode CPUs per GPU to feed ViT-B/32 at 770 samples/s, from the measured decode cost,
   against what cluster.yaml's GPU node type provides.
4. Scoring at scale: peak RSS of one scorer process (a ``ScorerWorker``, what each Ray actor
   runs) that embeds N corrupted cells, against N, for cells read memory-mapped from the cache
   (the worker) and for every cell kept in memory (what the worker did before).

    python benchmarks/bench_data.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from clipray.config.loading import load_experiment
from clipray.config.schema import SyntheticData
from clipray.core.data import CaptionedImages, load_split, resize_crop
from clipray.core.model import build_model
from clipray.core.shards import write_shards
from clipray.core.stream import StreamSpec, epoch_batches
from clipray.core.synthetic import synthetic_image
from clipray.core.tokens import fast
from clipray.core.trainer import NoHooks, Trainer, build_trainer
from clipray.sweep.ingest import ray_data_batches

MODEL, SIZE, BATCH, PER_SHARD = "clipray-small-vit", 64, 64, 512
VIT_B32_SAMPLES_PER_S = 770  # per A100 (ARCHITECTURE.md)
GPU_NODE = ("g5.2xlarge", 8, 1)  # cluster.yaml's worker type: vCPUs, GPUs


def make_shards(folder: Path, n: int) -> list[str]:
    """``n`` 224 px photo-like JPEGs (smooth colour fields plus noise), PER_SHARD per shard."""
    rng = np.random.default_rng(0)

    def samples():
        for i in range(n):
            base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(base).resize((224, 224), Image.Resampling.BICUBIC))
            noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            yield noisy, [f"a photo number {i} of something colourful"]

    return [str(p) for p in write_shards(samples(), folder, PER_SHARD)]


def plain_loop(shards: list[str], size: int = SIZE) -> int:
    n = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.name.endswith(".jpg"):
                    with Image.open(tar.extractfile(info)) as im:
                        im.draft("RGB", (size, size))
                        resize_crop(im.convert("RGB"), size)
                    n += 1
    return n


def loader(shards: list[str], tokenizer, n: int, workers: int = 0, source=epoch_batches):
    """(seconds to the n-th image, seconds to the 2n-th) of one run of clipray's stream."""
    spec = StreamSpec(shards, 0, 0, 1, BATCH, SIZE, None, 256, workers)
    t0, marks = time.perf_counter(), []
    with closing(source(spec, 0, 0, tokenizer)) as batches:
        for i, _ in enumerate(itertools.islice(batches, 2 * n // BATCH), 1):
            if i * BATCH in (n, 2 * n):
                marks.append(time.perf_counter() - t0)
    return marks[0], marks[1]


def plain(shards: list[str], n: int):
    """The same marks for the plain loop over the shards holding the first 2n images."""
    t0 = time.perf_counter()
    assert plain_loop(shards[: n // PER_SHARD]) == n
    one = time.perf_counter() - t0
    assert plain_loop(shards[n // PER_SHARD : 2 * n // PER_SHARD]) == n
    return one, time.perf_counter() - t0


def bench_loader(shards: list[str], n: int, rounds: int) -> float:
    """Steady-state images/s, n / (T(2n) - T(n)) within one run: start-up (processes, Ray
    Data's executor and task workers) and the shuffle buffer's first fill fall before T(n) (the
    shards hold 3n images, so no run drains its buffer at the end of a pass); start-up is
    reported apart, T(n) - n / rate."""
    tokenizer = build_model(load_experiment(None, [f"model.name={MODEL}"]).model).tokenizer
    variants = {
        "plain PIL loop over the tars (tarfile + decode + resize/crop)": lambda: plain(shards, n),
        "clipray stream on the calling thread, captions kept as text": lambda: loader(
            shards, list, n
        ),
        "clipray stream on the calling thread, tokenized": lambda: loader(shards, tokenizer, n),
        "clipray stream, 1 decode process (`ingest: processes`)": lambda: loader(
            shards, tokenizer, n, 1
        ),
        "clipray stream, 1 Ray Data decode task (`ingest: ray_data`)": lambda: loader(
            shards, tokenizer, n, 1, ray_data_batches
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    starts: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved: machine noise hits every variant alike
        for name, fn in variants.items():
            one, two = fn()
            rates[name].append(n / (two - one))
            starts[name].append(one - (two - one))
    median = {name: float(np.median(r)) for name, r in rates.items()}
    base = next(iter(median.values()))
    print(
        "| loader (224 px JPEG -> 64 px), one decode CPU | images/s, steady | ms/image | "
        "/ plain | start-up |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, rate in median.items():
        start = 1000 * float(np.median(starts[name]))
        print(f"| {name} | {rate:.0f} | {1000 / rate:.2f} | {rate / base:.2f}x | {start:.0f} ms |")
    print()
    return 1000 / list(median.values())[2]


def bench_tokenizer(rounds: int) -> None:
    """us per caption, open_clip's CLIP tokenizer against clipray's wrapper of it (a cold word
    cache each round), on captions with a small vocabulary and on captions of unseen words."""
    import open_clip

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    sets = {
        "the shards' captions (`a photo number 7 of ...`)": [
            f"a photo number {i} of something colourful" for i in range(2048)
        ],
        "synthetic layout captions": [
            c for i in range(512) for c in synthetic_image(SyntheticData(), "train", i)[1]
        ],
        "10 never-seen words each (every word a cache miss)": [
            " ".join("".join(rng.choice(letters, 8)) for _ in range(10)) for _ in range(1024)
        ],
    }
    print("| captions | open_clip us/caption | clipray us/caption | speed-up |")
    print("|---|---:|---:|---:|")
    for name, captions in sets.items():
        best = {"open_clip": np.inf, "clipray": np.inf}
        for _ in range(rounds):
            for kind in best:
                tok = open_clip.get_tokenizer(MODEL)
                tok = fast(tok) if kind == "clipray" else tok
                t0 = time.perf_counter()
                tok(captions)
                best[kind] = min(best[kind], (time.perf_counter() - t0) / len(captions))
        a, b = 1e6 * best["open_clip"], 1e6 * best["clipray"]
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.1f}x |")
    print()


class OneEpoch(NoHooks):
    """Stops ``fit`` at each epoch's checkpoint; the next ``fit`` continues from there."""

    def on_checkpoint(self, metrics, blob) -> bool:
        return True


def bench_training(shards: list[str], n: int, epochs: int) -> None:
    over = [
        f"model.name={MODEL}", "data.kind=webdataset", f"data.train={shards}",
        f"data.train_samples={n}", f"data.val={shards[0]}", "data.loader_workers=1",
        "data.shuffle_buffer=256", f"train.batch_size={BATCH}", f"train.epochs={epochs}",
        "train.warmup_steps=2", "perturb.epsilon=0",
    ]  # fmt: skip
    exp = load_experiment(None, over)
    torch.set_num_threads(1)
    runs = {
        "processes": build_trainer(exp, torch.device("cpu")),
        "ray_data": build_trainer(exp, torch.device("cpu"), source=ray_data_batches),
    }
    split = load_split(exp.data, "train")
    arrays = CaptionedImages(split.load_all(SIZE), split.captions, "in memory")
    torch.manual_seed(exp.seed)
    clip = build_model(exp.model)
    memory = Trainer(exp, clip, arrays, runs["processes"].val_split, torch.device("cpu"))
    for _ in range(epochs):  # interleaved epoch by epoch: machine noise hits all alike
        memory.fit(OneEpoch())
        for trainer in runs.values():
            trainer.fit(OneEpoch())
    print(
        "| epoch | in memory samples/s | processes samples/s (ratio) | Ray Data samples/s "
        "(ratio) | wait: memory | wait: processes | wait: Ray Data |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rows = zip(memory.history, runs["processes"].history, runs["ray_data"].history, strict=True)
    for e, (m, p, r) in enumerate(rows):
        rate = m["train/samples_per_s"]
        cells = [f"{h['train/samples_per_s']:.1f} ({h['train/samples_per_s'] / rate:.2f}x)"
                 for h in (p, r)]  # fmt: skip
        waits = [f"{100 * h['time/data_wait_fraction']:.1f} %" for h in (m, p, r)]
        print(f"| {e + 1} | {rate:.1f} | {' | '.join(cells)} | {' | '.join(waits)} |")
    print()


def on_paper(shards: list[str], ms_per_image: float) -> None:
    t0 = time.perf_counter()
    count = plain_loop(shards, 224)
    ms224 = 1000 * (time.perf_counter() - t0) / count
    cpus = VIT_B32_SAMPLES_PER_S * ms224 / 1000
    name, vcpus, gpus = GPU_NODE
    exp = load_experiment(Path(__file__).parent.parent / "sweeps" / "cluster.yaml")
    decode, rank = exp.data.loader_workers, exp.train.cpus_per_worker
    print(
        f"On paper (no GPU here): a 224 px model decodes the JPEG at full scale, "
        f"{ms224:.2f} ms of one core per image measured here ({ms_per_image:.2f} ms for the "
        f"64 px model above, which decodes at half scale). ViT-B/32 at "
        f"{VIT_B32_SAMPLES_PER_S} samples/s per GPU needs {cpus:.1f} decode CPUs per GPU; "
        f"cluster.yaml's {name} has {vcpus} vCPUs for {gpus} GPU; sweeps/cluster.yaml gives "
        f"each rank {rank:g} CPUs and {decode} Ray Data decode tasks, {decode / cpus:.0f}x "
        f"what ViT-B/32 needs from such shards.\n"
    )


CHEAP = ("gaussian_noise", "brightness", "contrast", "saturate")  # fast to build
EVAL_IMAGES = 1000


def rss_child(cells: int, mode: str, cache_dir: str) -> None:
    """In a fresh process: embed ``cells`` cells, print peak RSS (MiB)."""
    from clipray.core.encode import embed_images
    from clipray.scoring.cache import CorruptionCache
    from clipray.scoring.plan import load_eval_set
    from clipray.scoring.worker import ScorerWorker

    torch.set_num_threads(1)
    exp = load_experiment(None, [f"data.test_size={EVAL_IMAGES}", f"eval.cache_dir={cache_dir}"])
    ev = load_eval_set(exp)
    todo = [(c, sev) for sev in range(1, 6) for c in CHEAP][:cells]
    clip = build_model(exp.model)
    kept, worker = [], ScorerWorker(exp.to_dict(), cache_dir)
    for name, sev in todo:
        if mode == "memory":  # before: every cell of the shard resident
            spec = dict(split=ev.split, corruption=name, severity=sev, seed=exp.eval.seed)
            kept.append(CorruptionCache(cache_dir).get_or_build(ev.images, **spec))
            images = kept[-1]
        else:
            worker.load_cell(ev, (name, sev))
            images = worker._images((name, sev))
        with torch.no_grad():
            embed_images(clip, images, 256, torch.device("cpu"), "fp32")
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the (large) parent
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(int(hwm.split()[1]) / 1024)


def bench_rss(counts: tuple[int, ...]) -> None:
    cell_mib = EVAL_IMAGES * 64 * 64 * 3 / 2**20
    with tempfile.TemporaryDirectory() as cache:
        peak = {}
        for n in counts:
            for mode in ("memory", "mmap"):
                cmd = [sys.executable, __file__, "--rss-child", str(n), mode, cache]
                peak[n, mode] = float(subprocess.check_output(cmd, text=True).split()[-1])
    print(f"| cells ({cell_mib:.1f} MiB each) | peak RSS, cells in memory | peak RSS, mmap |")
    print("|---:|---:|---:|")
    for n in counts:
        print(f"| {n} | {peak[n, 'memory']:.0f} MiB | {peak[n, 'mmap']:.0f} MiB |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rss-child", nargs=3, metavar=("CELLS", "MODE", "CACHE"))
    args = parser.parse_args()
    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1], args.rss_child[2])
        return
    n = 512 if args.quick else 1024
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # Ray Data's tasks
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), 3 * n)  # no stream of 2n reaches the end of a pass
        ms = bench_loader(shards, n, 2 if args.quick else 3)
        bench_tokenizer(2 if args.quick else 3)
        bench_training(shards, 2 * n, 2 if args.quick else 3)  # epochs of 32 steps
        on_paper(shards, ms)
    ray.shutdown()
    bench_rss((2, 8) if args.quick else (2, 8, 20))


if __name__ == "__main__":
    main()
