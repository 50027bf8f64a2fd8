"""Cache entries read memory-mapped: the same images, verified the same way, and a scorer
worker that maps a cell only while it embeds it."""

from __future__ import annotations

import numpy as np
import pytest

from clipray.scoring import corruptions as C
from clipray.scoring.cache import CACHE_FORMAT, CorruptionCache, map_entry
from clipray.scoring.plan import load_eval_set
from clipray.scoring.worker import ScorerWorker
from tests.conftest import small_experiment
from tests.test_corrupt_cache import SPEC, clean_set


def test_a_mapped_entry_is_the_built_one_read_only(tmp_path):
    images = clean_set()
    cache = CorruptionCache(tmp_path)
    built = cache.get_or_build(images, **SPEC, mmap=True)  # built, then mapped from disk
    assert isinstance(built, np.memmap) and not built.flags.writeable
    again = CorruptionCache(tmp_path)
    hit = again.get_or_build(images, **SPEC, mmap=True)
    assert isinstance(hit, np.memmap) and again.stats.hits == 1
    expected = C.corrupt_batch(images, "gaussian_noise", 2, 7)
    assert np.array_equal(built, expected) and np.array_equal(hit, expected)
    assert CACHE_FORMAT == 2 and cache.key_for(images, **SPEC).cache_format == 2


def test_a_damaged_mapped_entry_is_rejected_and_rebuilt(tmp_path):
    images = clean_set()
    CorruptionCache(tmp_path).get_or_build(images, **SPEC)
    path = CorruptionCache(tmp_path).path_for(images, **SPEC)
    data = bytearray(path.read_bytes())
    data[map_entry(path).offset + 5] ^= 0xFF  # one pixel of the mapped array
    path.write_bytes(bytes(data))
    cache = CorruptionCache(tmp_path)
    rebuilt = cache.get_or_build(images, **SPEC, mmap=True)
    assert (cache.stats.rejected, cache.stats.builds) == (1, 1)
    assert np.array_equal(rebuilt, C.corrupt_batch(images, "gaussian_noise", 2, 7))


def test_a_compressed_entry_is_not_mapped(tmp_path):
    path = tmp_path / "x.npz"
    np.savez_compressed(path, images=clean_set(), manifest=np.array("{}"))
    with pytest.raises(ValueError, match="compressed"):
        map_entry(path)


def test_the_worker_keeps_paths_and_maps_cells_on_use(tmp_path):
    exp = small_experiment(f"eval.cache_dir={tmp_path}")
    worker = ScorerWorker(exp.to_dict(), str(tmp_path))
    worker.load_cell(load_eval_set(exp), ("fog", 1))
    assert all(not isinstance(v, np.ndarray) for v in worker.cells.values())
    images = worker._images(("fog", 1))
    assert isinstance(images, np.memmap)
    expected = C.corrupt_batch(worker.clean, "fog", 1, exp.eval.seed)
    assert np.array_equal(images, expected)
