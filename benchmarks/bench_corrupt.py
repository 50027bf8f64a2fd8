"""Benchmark clipray.corrupt against the imagecorruptions reference, side by side in one run.

Prints markdown tables: images/s per corruption for our wrapper and for the package's own
function (made runnable) at 224x224 and 64x64, severity 3, with an identical-output check; the
glass_blur speed-up per severity at 224x224; and a cache hit against a build for one entry.

    python benchmarks/bench_corrupt.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from clipray.config import corruption_names as N
from clipray.scoring import corruptions as C
from clipray.scoring.cache import CorruptionCache, fingerprint_images


def synthetic_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Pictures with smooth shading, edges and texture (so every corruption has work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = np.stack([0.5 + 0.4 * y, 0.6 + 0.3 * x, 0.8 - 0.3 * y], axis=-1)
        for _ in range(4):
            cx, cy, r = rng.uniform(0.15, 0.85, 2).tolist() + [rng.uniform(0.05, 0.2)]
            img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
        img += rng.normal(0, 0.03, img.shape)
        out[i] = np.uint8(np.clip(img, 0, 1) * 255)
    return out


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
    """Best wall time of `repeats` calls (the machine is shared and noisy) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_ours(images: np.ndarray, name: str, severity: int) -> list[np.ndarray]:
    return [C.corrupt(img, name, severity, seed) for seed, img in enumerate(images)]


def run_reference(images: np.ndarray, name: str, severity: int) -> list[np.ndarray]:
    state = np.random.get_state()
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            return [
                C.reference_corrupt(img, name, severity, seed) for seed, img in enumerate(images)
            ]
    finally:
        np.random.set_state(state)


def per_corruption_table(sizes: dict[int, int], severity: int = 3) -> None:
    """Images/s of ours vs the reference for every corruption at each size."""
    header = "| corruption |" + "".join(
        f" ours {s}px img/s | ref {s}px img/s | speed-up {s} | same {s} |" for s in sizes
    )
    print(header)
    print("|" + "---|" * (1 + 4 * len(sizes)))
    sets = {s: synthetic_images(n, s) for s, n in sizes.items()}
    for name in C.REGISTRY:
        cells = []
        for images in sets.values():
            run_ours(images[:1], name, severity)  # warm caches (frost files, imports)
            # Best of 3 for both; the glass_blur reference only once (seconds per image).
            t_ours, ours = timed(partial(run_ours, images, name, severity), repeats=3)
            t_ref, ref = timed(
                partial(run_reference, images, name, severity),
                repeats=1 if name == "glass_blur" else 3,
            )
            same = all(np.array_equal(a, b) for a, b in zip(ours, ref, strict=True))
            n = len(images)
            cells.append(
                f" {n / t_ours:9.1f} | {n / t_ref:9.1f} | {t_ref / t_ours:6.1f}x |"
                f" {'yes' if same else 'NO'} |"
            )
        print(f"| {name} |" + "".join(cells), flush=True)


def glass_blur_table(size: int, ours_repeats: int) -> None:
    """glass_blur per severity: one image, reference once, ours best of several."""
    image = synthetic_images(1, size, seed=1)
    print(f"\n| glass_blur {size}px | ours ms | reference ms | speed-up | identical |")
    print("|---|---|---|---|---|")
    for severity in N.SEVERITIES:
        t_ours, ours = timed(partial(run_ours, image, "glass_blur", severity), ours_repeats)
        t_ref, ref = timed(partial(run_reference, image, "glass_blur", severity))
        same = np.array_equal(ours[0], ref[0])
        print(
            f"| severity {severity} | {t_ours * 1e3:.1f} | {t_ref * 1e3:.0f} |"
            f" {t_ref / t_ours:.0f}x | {'yes' if same else 'NO'} |",
            flush=True,
        )


def cache_table(n: int, size: int) -> None:
    """Build vs hit for one cache entry per corruption (a fresh instance for the hit)."""
    images = synthetic_images(n, size, seed=2)
    print(
        f"\n| cache entry ({n} x {size}px, severity 3) | build s | hit s | build/hit |"
        " fingerprint s |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for name in ("gaussian_noise", "zoom_blur"):
            spec = {"split": "bench", "corruption": name, "severity": 3, "seed": 0}
            t_fp, fingerprint = timed(partial(fingerprint_images, images))
            builder = CorruptionCache(root)
            t_build, _ = timed(partial(builder.get_or_build, images, **spec))
            reader = CorruptionCache(root)
            t_hit, _ = timed(partial(reader.get_or_build, images, **spec, fingerprint=fingerprint))
            assert builder.stats.builds == 1 and reader.stats.hits == 1
            assert reader.stats.builds == 0
            print(
                f"| {name} | {t_build:.3f} | {t_hit:.4f} | {t_build / t_hit:.0f}x | {t_fp:.4f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer images per cell (about a third of the full run's time)",
    )
    args = parser.parse_args()
    # A few images per cell: enough to average per-image noise, small enough for ~2 minutes.
    sizes = {224: 2, 64: 4} if args.quick else {224: 4, 64: 12}
    print(
        f"numpy {np.__version__}, imagecorruptions {C.IMAGECORRUPTIONS_VERSION}, "
        f"wrapper v{C.WRAPPER_VERSION}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    print(f"severity 3, images per cell: {sizes}\n")
    start = time.perf_counter()
    per_corruption_table(sizes)
    glass_blur_table(224, ours_repeats=3 if args.quick else 7)
    cache_table(n=16 if args.quick else 64, size=224)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
