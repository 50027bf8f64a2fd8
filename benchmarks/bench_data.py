"""Streaming training input from WebDataset shards, measured side by side in one run.

1. Loader alone, one decode CPU: images/s of clipray's stream (read the tar, decode the JPEG,
   resize + centre-crop, shuffle buffer, tokenize, batch) against a plain loop over the same
   224 px JPEG shards (tarfile + PIL decode + the same resize), all on the calling thread; the
   stream also with captions left untokenized (the loop does not tokenize).
2. Training from those shards (one decode process, the training thread with one torch thread)
   against the same Trainer fed the same images from in-memory arrays (one torch thread): samples/s
   and the share of step time the training thread waited for its next batch, per epoch. The model
   (clipray-small-vit at batch 64) costs more per step than decoding its batch.
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
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipray.config.loading import load_experiment
from clipray.core.data import CaptionedImages, load_split, resize_crop
from clipray.core.model import build_model
from clipray.core.shards import write_shards
from clipray.core.stream import StreamSpec, epoch_batches
from clipray.core.trainer import NoHooks, Trainer, build_trainer

MODEL, SIZE, BATCH = "clipray-small-vit", 64, 64
VIT_B32_SAMPLES_PER_S = 770  # per A100 (ARCHITECTURE.md)
GPU_NODE = ("g5.2xlarge", 8, 1)  # cluster.yaml's worker type: vCPUs, GPUs


def make_shards(folder: Path, n: int) -> list[str]:
    """``n`` 224 px photos-like JPEGs (smooth colour fields plus noise), 128 per shard."""
    rng = np.random.default_rng(0)

    def samples():
        for i in range(n):
            base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(base).resize((224, 224), Image.Resampling.BICUBIC))
            noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            yield noisy, [f"a photo number {i} of something colourful"]

    return [str(p) for p in write_shards(samples(), folder, 128)]


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


def loader(shards: list[str], tokenizer, n: int) -> int:
    spec = StreamSpec(shards, 0, 0, 1, BATCH, SIZE, None, 256, 0)
    steps = n // BATCH
    return sum(len(b.images) for b in itertools.islice(epoch_batches(spec, 0, 0, tokenizer), steps))


def bench_loader(shards: list[str], n: int, rounds: int) -> float:
    tokenizer = build_model(load_experiment(None, [f"model.name={MODEL}"]).model).tokenizer
    variants = {
        "plain": lambda: plain_loop(shards),
        "stream": lambda: loader(shards, tokenizer, n),
        "untokenized": lambda: loader(shards, list, n),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved: machine noise hits every variant alike
        for name, fn in variants.items():
            t0 = time.perf_counter()
            count = fn()
            rates[name].append(count / (time.perf_counter() - t0))
    plain, stream, bare = (float(np.median(rates[k])) for k in variants)
    print("| loader, 1 decode CPU (224 px JPEG -> 64 px) | images/s | ms/image | / plain |")
    print("|---|---:|---:|---:|")
    print(f"| plain PIL loop over the tars | {plain:.0f} | {1000 / plain:.2f} | 1.00x |")
    print(
        f"| clipray stream, captions kept as text | {bare:.0f} | {1000 / bare:.2f} | "
        f"{bare / plain:.2f}x |"
    )
    print(
        f"| **clipray stream, tokenized (what training gets)** | {stream:.0f} | "
        f"{1000 / stream:.2f} | **{stream / plain:.2f}x** |\n"
    )
    return 1000 / stream


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
    streamed = build_trainer(exp, torch.device("cpu"))
    split = load_split(exp.data, "train")
    arrays = CaptionedImages(split.load_all(SIZE), split.captions, "in memory")
    torch.manual_seed(exp.seed)
    clip = build_model(exp.model)
    memory = Trainer(exp, clip, arrays, streamed.val_split, torch.device("cpu"))
    for _ in range(epochs):  # interleaved epoch by epoch: machine noise hits both alike
        memory.fit(OneEpoch())
        streamed.fit(OneEpoch())
    print(
        "| epoch | in memory samples/s | shards samples/s | ratio | wait: memory | wait: shards |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for e, (m, s) in enumerate(zip(memory.history, streamed.history, strict=True)):
        ratio = s["train/samples_per_s"] / m["train/samples_per_s"]
        print(
            f"| {e + 1} | {m['train/samples_per_s']:.1f} | {s['train/samples_per_s']:.1f} | "
            f"{ratio:.2f}x | {100 * m['time/data_wait_fraction']:.1f} % | "
            f"{100 * s['time/data_wait_fraction']:.1f} % |"
        )
    print()


def on_paper(shards: list[str], ms_per_image: float) -> None:
    t0 = time.perf_counter()
    count = plain_loop(shards, 224)
    ms224 = 1000 * (time.perf_counter() - t0) / count
    cpus = VIT_B32_SAMPLES_PER_S * ms224 / 1000
    name, vcpus, gpus = GPU_NODE
    print(
        f"On paper (no GPU here): a 224 px model decodes the JPEG at full scale, "
        f"{ms224:.2f} ms of one core per image measured here ({ms_per_image:.2f} ms for the "
        f"64 px model above, which decodes at half scale). ViT-B/32 at "
        f"{VIT_B32_SAMPLES_PER_S} samples/s per GPU needs {cpus:.1f} decode CPUs per GPU; "
        f"cluster.yaml's {name} has {vcpus} vCPUs for {gpus} GPU, about {vcpus // gpus - 1} "
        f"for decoding beside the training process.\n"
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
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), n)
        ms = bench_loader(shards, n, 2 if args.quick else 3)
        bench_training(shards, n, 2 if args.quick else 3)
        on_paper(shards, ms)
    bench_rss((2, 8) if args.quick else (2, 8, 20))


if __name__ == "__main__":
    main()
