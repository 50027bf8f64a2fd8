"""ImageNet-C corruptions from the `imagecorruptions` package, made runnable, seeded and fast.

The package (1.1.2) is the reference and stays a plain dependency: we neither fork nor vendor it.
On today's stack three of its imports/calls are broken (``pkg_resources`` is gone, skimage dropped
``multichannel``, NumPy 2 dropped ``np.float_``) and its draws come from the global NumPy stream.
We run the package's own function objects against a private copy of their module globals in
which those few names are replaced; the package module itself, numpy and skimage stay untouched.
Two corruptions get our own code: ``glass_blur`` (a vectorised, bit-identical version of the
sequential pixel loop) and a NaN guard on ``spatter``; the bundled frost images are read and
rescaled once per process. All draws come from a thread-local ``RandomState`` seeded per call,
which yields the same stream as ``np.random.seed(seed)`` would.
"""

from __future__ import annotations

import contextvars
import hashlib
import importlib.metadata
import importlib.util
import operator
import os
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import FunctionType, ModuleType
from typing import Any

import cv2
import numpy as np
import skimage
from PIL import Image
from skimage.filters import gaussian as _sk_gaussian

from clipray.config.corruption_names import (
    DETERMINISTIC,
    GROUPS,
    MIN_SIDE,
    NAMES,
    check_name,
    check_severity,
)

# Bump when corrupt() output changes for identical inputs: it is part of every cache key.
WRAPPER_VERSION = "1"
# The release whose module globals the compatibility layer replaces (pinned in pyproject.toml).
SUPPORTED_VERSION = "1.1.2"
IMAGECORRUPTIONS_VERSION = importlib.metadata.version("imagecorruptions")


# ---------------------------------------------------------------- making the package importable


def _resource_filename(package: str, resource: str) -> str:
    """The one pkg_resources call the package makes: a file next to `package`'s module."""
    base = os.path.dirname(sys.modules[package].__file__ or "")
    return os.path.normpath(os.path.join(base, resource))


def _import_package() -> ModuleType:
    """Import imagecorruptions.corruptions; lend it a pkg_resources shim only while importing.

    The shim is installed only when no real pkg_resources exists and is removed right after, so
    no other code can ever see it.
    """
    if "imagecorruptions.corruptions" in sys.modules:
        return sys.modules["imagecorruptions.corruptions"]
    shim = None
    if importlib.util.find_spec("pkg_resources") is None:
        shim = ModuleType("pkg_resources")
        shim.resource_filename = _resource_filename  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    try:
        with warnings.catch_warnings():  # deprecated scipy.ndimage.interpolation (and a real
            warnings.simplefilter("ignore")  # pkg_resources, where present) warn on import
            import imagecorruptions.corruptions as module
    finally:
        if shim is not None and sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]
    return module


_PACKAGE = _import_package()
# The globals _namespace replaces and the functions it runs: present in 1.1.2. Another release
# may lack them; say so at import rather than fail inside some later corruption call.
_REPLACED = ("np", "sk", "gaussian", "resource_filename", "cv2")
_missing = [n for n in (*_REPLACED, *NAMES) if n not in vars(_PACKAGE)]
if _missing:
    raise ImportError(
        f"imagecorruptions {IMAGECORRUPTIONS_VERSION} lacks {', '.join(_missing)}; clipray's "
        f"compatibility layer needs imagecorruptions=={SUPPORTED_VERSION}"
    )


class _Overlay:
    """A view of a module with a few names replaced; every other name reads through."""

    def __init__(self, base: Any, **overrides: Any) -> None:
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def _gaussian_compat(
    image: np.ndarray, sigma: Any = 1, *, multichannel: bool | None = None, **kwargs: Any
) -> np.ndarray:
    """skimage's gaussian accepting the removed `multichannel` flag (True -> channel_axis=-1).

    skimage 0.19 mapped multichannel=True to channel_axis=-1 itself; both give sigma 0 on the
    channel axis and the same scipy gaussian_filter call, so results are unchanged.
    """
    if multichannel:
        kwargs["channel_axis"] = -1
    return _sk_gaussian(image, sigma, **kwargs)


def _seeded_random_noise(random: Any, image: np.ndarray, mode: str, **kwargs: Any) -> np.ndarray:
    """skimage random_noise seeded from one draw of the package's stream (reproducible)."""
    seed = int(random.randint(0, np.iinfo(np.int64).max, dtype=np.int64))
    return skimage.util.random_noise(image, mode=mode, rng=seed, **kwargs)


def _namespace(random: Any, cv2_module: Any) -> dict[str, Any]:
    """Copy of the package module's globals with the compatibility names and `random` source.

    Every function defined in the package is re-created over this copy, so calls between them
    (fog -> plasma_fractal, snow -> _motion_blur) stay inside it.
    """
    ns = dict(vars(_PACKAGE))
    ns.update(
        np=_Overlay(np, float_=np.float64, random=random),
        sk=_Overlay(
            skimage,
            util=_Overlay(
                skimage.util,
                random_noise=lambda image, mode, **kw: _seeded_random_noise(
                    random, image, mode, **kw
                ),
            ),
        ),
        gaussian=_gaussian_compat,
        resource_filename=_resource_filename,
        cv2=cv2_module,
    )
    for name, obj in list(ns.items()):
        if isinstance(obj, FunctionType) and obj.__globals__ is vars(_PACKAGE):
            clone = FunctionType(obj.__code__, ns, obj.__name__, obj.__defaults__, obj.__closure__)
            clone.__kwdefaults__ = obj.__kwdefaults__
            ns[name] = clone
    return ns


# ---------------------------------------------------------------- reference (tests, benchmark)

_REFERENCE = _namespace(np.random, cv2)


def reference_function(name: str) -> Callable[[Image.Image, int], Any]:
    """The package's own function `name`, made runnable; draws from the global np.random.

    impulse_noise additionally passes skimage an rng seeded from one global-stream draw.
    """
    return _REFERENCE[check_name(name)]


def reference_corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """What the package's corrupt() gives after np.random.seed(seed). Mutates global RNG state."""
    np.random.seed(seed)
    return np.uint8(reference_function(name)(Image.fromarray(image), severity))


# ---------------------------------------------------------------- our production namespace

_ACTIVE_RNG: contextvars.ContextVar[np.random.RandomState | None] = contextvars.ContextVar(
    "clipray_corrupt_rng", default=None
)


class _ContextRandom:
    """Stands in for np.random inside the package: forwards to the RandomState of this call."""

    def __getattr__(self, name: str) -> Any:
        rng = _ACTIVE_RNG.get()
        if rng is None:
            raise RuntimeError("corruption called outside clipray.corrupt.corrupt()")
        return getattr(rng, name)


class _FrostImage(np.ndarray):
    """A bundled frost image that knows its file, so its resizes can be memoised by path."""

    path: str


@lru_cache(maxsize=8)  # the 6 bundled frost images, never evicted: read once per process
def _frost_image(path: str) -> _FrostImage:
    image = cv2.imread(path)
    if image is None:
        raise FileNotFoundError(f"imagecorruptions frost image missing: {path}")
    frost = image.view(_FrostImage)
    frost.path = path
    frost.setflags(write=False)  # shared between calls; frost only reads it
    return frost


@lru_cache(maxsize=32)  # a sweep uses one or two resolutions: <= 6 rescaled frosts each
def _frost_resized(path: str, dsize: tuple[int, int], interpolation: int) -> np.ndarray:
    source = np.asarray(_frost_image(path))
    out = cv2.resize(source, dsize=dsize, interpolation=interpolation)
    out.setflags(write=False)
    return out


def _resize_memo(src: np.ndarray, dsize: Any, interpolation: int) -> np.ndarray:
    """cv2.resize, memoised when `src` is a bundled frost image (the only caller is frost)."""
    if isinstance(src, _FrostImage):
        return _frost_resized(src.path, tuple(dsize), interpolation)
    return cv2.resize(src, dsize=dsize, interpolation=interpolation)


_OURS = _namespace(_ContextRandom(), _Overlay(cv2, imread=_frost_image, resize=_resize_memo))

# glass_blur parameters as in the package: (sigma, max_delta, iterations) per severity.
_GLASS = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))


def sequential_copy_sources(
    height: int, width: int, dy: np.ndarray, dx: np.ndarray, delta: int
) -> np.ndarray:
    """Flat source index per pixel after the package's sequential glass_blur pass.

    The package walks h = H-delta .. delta+1 and, inside, w = W-delta .. delta+1 (both
    descending) and does ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views: the first
    assignment overwrites x[h, w] and the second writes it back, so the net effect is the copy
    x[h, w] <- x[h', w'] as it is at that moment. If (h', w') was written earlier in the pass
    its value came from its own source, so we follow source links while they point to an
    earlier-written pixel (pointer jumping, O(log chain) vectorised rounds).
    `dy`, `dx` have shape (rows, cols) in visiting order.
    """
    rows = np.arange(height - delta, delta, -1)
    cols = np.arange(width - delta, delta, -1)
    n = height * width
    target = (rows[:, None] * width + cols[None, :]).ravel()
    source = ((rows[:, None] + dy) * width + cols[None, :] + dx).ravel()
    when = np.full(n, n, dtype=np.intp)  # never-written pixels count as "written after all"
    when[target] = np.arange(target.size)
    src = np.arange(n)
    src[target] = source
    hop = np.arange(n)  # fixed point = end of the chain
    hop[target] = np.where(when[source] < when[target], source, target)
    while True:
        nxt = hop[hop]
        if np.array_equal(nxt, hop):
            return src[hop]
        hop = nxt


def _glass_blur(x: Image.Image, severity: int) -> np.ndarray:
    """The package's glass_blur with identical draws and result, without the per-pixel loop."""
    sigma, delta, iterations = _GLASS[severity - 1]
    img = np.uint8(_sk_gaussian(np.array(x) / 255.0, sigma=sigma, channel_axis=-1) * 255)
    height, width = img.shape[:2]
    shape = (max(height - 2 * delta, 0), max(width - 2 * delta, 0), 2)
    rng = _ContextRandom()
    index = np.arange(height * width)  # pixel i of the result is pixel index[i] of img
    for _ in range(iterations):
        # One bulk draw equals the package's per-pixel randint(..., size=(2,)) calls in order.
        draws = rng.randint(-delta, delta, size=shape)
        index = index[sequential_copy_sources(height, width, draws[..., 1], draws[..., 0], delta)]
    img = np.take(img.reshape(height * width, -1), index, axis=0).reshape(img.shape)
    return np.clip(_sk_gaussian(img / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255


def _spatter(x: Image.Image, severity: int) -> np.ndarray:
    """The package's spatter; when no liquid survives its threshold, the clean image.

    With an empty liquid layer the package divides 0 by 0 (m /= max(m)), turning the whole
    image into NaN (black after the uint8 cast). Its formula with m = 0 is the input through
    a float32 x / 255 * 255 round trip, which is exact for every byte value: the input itself.
    Happens at small sizes only (about 2% of seeds at 32x32, severity 1).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.asarray(_OURS["spatter"](x, severity))
    return np.array(x) if np.isnan(out).any() else out


@dataclass(frozen=True)
class Corruption:
    """One registry entry: its group, whether it uses the seed, and the function we run."""

    name: str
    group: str
    seeded: bool
    fn: Callable[[Image.Image, int], Any]


_OVERRIDES: Mapping[str, Callable[[Image.Image, int], Any]] = {
    "glass_blur": _glass_blur,
    "spatter": _spatter,
}
REGISTRY: Mapping[str, Corruption] = {
    name: Corruption(name, group, name not in DETERMINISTIC, _OVERRIDES.get(name, _OURS[name]))
    for group in ("common", "extra")
    for name in GROUPS[group]
}


def check_seed(seed: int) -> int:
    """`seed` as int if it can seed a RandomState (0 <= seed < 2**32), else ValueError."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not 0 <= int(seed) < 2**32
    ):
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def check_image(image: np.ndarray) -> np.ndarray:
    """`image` if it is a uint8 HxWx3 array with both sides >= MIN_SIDE, else ValueError."""
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
        or min(image.shape[:2]) < MIN_SIDE
    ):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"image must be a uint8 array HxWx3 with H, W >= {MIN_SIDE}, got {got}")
    return image


def derive_seed(base_seed: int, image_index: int, name: str, severity: int) -> int:
    """Per-image seed in [0, 2**32) from a sha256 of the fields (same in every process)."""
    index = operator.index(image_index)
    if index < 0:
        raise ValueError(f"image_index must be >= 0, got {image_index!r}")
    text = (
        f"clipray.corrupt|{operator.index(base_seed)}|{index}|{check_name(name)}|"
        f"{check_severity(severity)}"
    )
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


_THREAD = threading.local()


def _seeded_stream(seed: int) -> np.random.RandomState:
    """This thread's RandomState reseeded with `seed`.

    Same stream as RandomState(seed) or np.random.seed(seed); reseeding costs ~2 us where a new
    RandomState costs ~180 us, which dominated cheap corruptions at 64x64.
    """
    rng = getattr(_THREAD, "rng", None)
    if rng is None:
        rng = _THREAD.rng = np.random.RandomState()
    rng.seed(seed)
    return rng


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt one uint8 HxWx3 image; a pure function of its arguments.

    Draws come from a thread-private RandomState seeded with `seed`, so the global NumPy state
    is never touched and the result equals the package's function right after
    np.random.seed(seed).
    """
    entry = REGISTRY[check_name(name)]
    severity, seed = check_severity(severity), check_seed(seed)
    check_image(image)
    token = _ACTIVE_RNG.set(_seeded_stream(seed))
    try:
        out = np.uint8(entry.fn(Image.fromarray(image), severity))
    finally:
        _ACTIVE_RNG.reset(token)
    if out.shape != image.shape:
        raise RuntimeError(f"{name} returned shape {out.shape} for input {image.shape}")
    return out


def corrupt_batch(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """corrupt() over N images; image i uses derive_seed(seed, i, name, severity)."""
    check_name(name)
    severity = check_severity(severity)
    if not isinstance(images, np.ndarray) or images.ndim != 4 or len(images) == 0:
        got = getattr(images, "shape", type(images))
        raise ValueError(f"images must be a non-empty uint8 array NxHxWx3, got {got}")
    check_image(images[0])
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = corrupt(image, name, severity, derive_seed(seed, i, name, severity))
    return out
