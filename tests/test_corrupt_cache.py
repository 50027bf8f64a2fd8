"""Tests for clipray.corrupt_cache on a real filesystem with real corruptions."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from clipray.scoring import corruptions as C
from clipray.scoring.cache import CorruptionCache, EntryKey, fingerprint_images

SPEC = {"split": "val", "corruption": "gaussian_noise", "severity": 2, "seed": 7}


def clean_set(n: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def files_under(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- fingerprints and keys


def test_fingerprint_tracks_content_shape_and_layout():
    images = clean_set()
    fp = fingerprint_images(images)
    assert fp == fingerprint_images(images.copy())
    assert fp == hashlib.sha256(f"|u1|{images.shape}|".encode() + images.tobytes()).hexdigest()
    changed = images.copy()
    changed[2, 31, 31, 2] ^= 1
    assert fingerprint_images(changed) != fp
    assert fingerprint_images(images.reshape(3, 32, 96, 1)) != fp  # same bytes, other shape
    strided = clean_set(3, 64)[:, ::2, ::2]
    assert fingerprint_images(strided) == fingerprint_images(np.ascontiguousarray(strided))


def test_key_uses_installed_versions():
    key = CorruptionCache("unused").key_for(clean_set(), **SPEC)
    assert key.imagecorruptions_version == importlib.metadata.version("imagecorruptions")
    assert key.wrapper_version == C.WRAPPER_VERSION
    assert key.resolution == (32, 32) and key.fingerprint == fingerprint_images(clean_set())


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(EntryKey)])
def test_every_key_field_changes_the_digest(field):
    key = CorruptionCache("unused").key_for(clean_set(), **SPEC)
    value = getattr(key, field)
    other = {str: lambda v: v + "x", int: lambda v: v + 1, tuple: lambda v: (v[0] + 1, v[1])}
    changed = dataclasses.replace(key, **{field: other[type(value)](value)})
    assert changed.digest() != key.digest()


@pytest.mark.parametrize(
    "images, change",
    [
        (clean_set(), {"split": "test"}),
        (clean_set(), {"corruption": "speckle_noise"}),
        (clean_set(), {"severity": 3}),
        (clean_set(), {"seed": 8}),
        (clean_set(seed=1), {}),
        (clean_set(size=48), {}),
    ],
)
def test_path_changes_with_inputs(tmp_path, images, change):
    cache = CorruptionCache(tmp_path)
    assert cache.path_for(images, **{**SPEC, **change}) != cache.path_for(clean_set(), **SPEC)


# ---------------------------------------------------------------- hits and builds


def test_build_then_hit_across_instances(tmp_path):
    images = clean_set()
    cache = CorruptionCache(tmp_path)
    assert not cache.has(images, **SPEC) and cache.lookup(images, **SPEC) is None
    built = cache.get_or_build(images, **SPEC)
    expected = C.corrupt_batch(images, "gaussian_noise", 2, 7)
    assert np.array_equal(built, expected)
    assert (cache.stats.builds, cache.stats.hits, cache.stats.last_hit) == (1, 0, False)
    path = cache.path_for(images, **SPEC)
    stamp = path.stat().st_mtime_ns
    assert files_under(tmp_path) == [str(path.relative_to(tmp_path))]  # no temp file left

    second = CorruptionCache(tmp_path)  # e.g. the next checkpoint's scorer
    again = second.get_or_build(images, **SPEC, fingerprint=fingerprint_images(images))
    assert np.array_equal(again, expected)
    assert (second.stats.builds, second.stats.hits, second.stats.last_hit) == (0, 1, True)
    assert path.stat().st_mtime_ns == stamp and second.has(images, **SPEC)


def test_stale_temp_files_are_ignored(tmp_path):
    images = clean_set()
    cache = CorruptionCache(tmp_path)
    path = cache.path_for(images, **SPEC)
    path.parent.mkdir(parents=True)
    (path.parent / f".{path.name}.crashed.tmp").write_bytes(b"PK\x03\x04 half a zip")
    (path.parent / f".{path.name}.empty.tmp").write_bytes(b"")
    assert not cache.has(images, **SPEC)
    built = cache.get_or_build(images, **SPEC)
    assert cache.get_or_build(images, **SPEC) is not None and cache.stats.hits == 1
    assert np.array_equal(cache.lookup(images, **SPEC), built) and cache.stats.rejected == 0


# ---------------------------------------------------------------- damaged entries


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def _tamper_images_keep_manifest(path):
    with np.load(path) as archive:
        images, manifest = archive["images"].copy(), archive["manifest"]
    images[0, 0, 0, 0] ^= 1
    np.savez(path, images=images, manifest=manifest)


def _wrong_shape_keep_manifest(path):
    with np.load(path) as archive:
        images, manifest = archive["images"], archive["manifest"]
    np.savez(path, images=images[:2], manifest=manifest)


def _entry_of_other_key(path):
    other = CorruptionCache(path.parent / "other")
    other.get_or_build(clean_set(), **{**SPEC, "seed": 99})
    path.write_bytes(next((path.parent / "other").rglob("*.npz")).read_bytes())


def _not_a_zip(path):
    path.write_bytes(b"\x93NUMPY garbage")


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        _flip_payload_byte,
        _tamper_images_keep_manifest,
        _wrong_shape_keep_manifest,
        _entry_of_other_key,
        _not_a_zip,
    ],
)
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, damage):
    images = clean_set()
    CorruptionCache(tmp_path).get_or_build(images, **SPEC)
    path = CorruptionCache(tmp_path).path_for(images, **SPEC)
    damage(path)
    cache = CorruptionCache(tmp_path)
    assert not cache.has(images, **SPEC)
    rebuilt = cache.get_or_build(images, **SPEC)
    assert (cache.stats.rejected, cache.stats.builds, cache.stats.hits) == (1, 1, 0)
    assert np.array_equal(rebuilt, C.corrupt_batch(images, "gaussian_noise", 2, 7))
    assert cache.has(images, **SPEC)


def test_manifest_records_key_shape_and_hash(tmp_path):
    images = clean_set()
    cache = CorruptionCache(tmp_path)
    built = cache.get_or_build(images, **SPEC)
    with np.load(cache.path_for(images, **SPEC)) as archive:
        manifest = json.loads(str(archive["manifest"]))
    assert manifest["key"] == cache.key_for(images, **SPEC).fields_json()
    assert manifest["shape"] == [3, 32, 32, 3] and manifest["dtype"] == "uint8"
    assert manifest["sha256"] == hashlib.sha256(built.tobytes()).hexdigest()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "images, change",
    [
        (clean_set(), {"corruption": "fogg"}),
        (clean_set(), {"severity": 0}),
        (clean_set(), {"severity": 6}),
        (clean_set(), {"seed": -1}),
        (clean_set(), {"split": ""}),
        (clean_set(), {"fingerprint": "abc"}),
        (clean_set()[:0], {}),
        (clean_set().astype(np.float32), {}),
        (clean_set()[0], {}),
        (clean_set(size=16), {}),
    ],
)
def test_bad_input_raises_and_writes_nothing(tmp_path, images, change):
    root = tmp_path / "cache"
    cache = CorruptionCache(root)
    with pytest.raises(ValueError):
        cache.get_or_build(images, **{**SPEC, **change})
    assert not root.exists()
    assert cache.stats == type(cache.stats)()


# ---------------------------------------------------------------- concurrency

_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from clipray.scoring.cache import CorruptionCache
    root, images_file, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    images = np.load(images_file)
    spec = dict(split="val", corruption="glass_blur", severity=5, seed=3)
    while not go.exists():
        time.sleep(0.005)
    cache = CorruptionCache(root)
    first = cache.get_or_build(images, **spec)
    for _ in range(20):  # read while siblings may still be replacing the file
        seen = cache.lookup(images, **spec)
        assert seen is not None and np.array_equal(seen, first), "bad read"
    print(cache.stats.builds, cache.stats.hits)
""")


def test_concurrent_builders_leave_one_valid_entry(tmp_path):
    images = clean_set(n=12, size=64)
    np.save(tmp_path / "images.npy", images)
    go = tmp_path / "go"
    root = tmp_path / "cache"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(root), str(tmp_path / "images.npy"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    go.touch()
    results = [child.communicate(timeout=120) for child in children]
    assert all(child.returncode == 0 for child in children), results
    cache = CorruptionCache(root)
    expected = C.corrupt_batch(images, "glass_blur", 5, 3)
    spec = {**SPEC, "corruption": "glass_blur", "severity": 5, "seed": 3}
    assert np.array_equal(cache.get_or_build(images, **spec), expected)
    assert cache.stats.hits == 1
    assert [p.suffix for p in root.rglob("*") if p.is_file()] == [".npz"]
