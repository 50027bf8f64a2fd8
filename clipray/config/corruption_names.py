"""The corruption names a config may use: imagecorruptions' 15 ImageNet-C + 4 extra, by group.

Names only (no image code), so validating a config does not import cv2, scikit-image or the
package itself; :mod:`clipray.scoring.corruptions` runs them and checks at import that the
installed package has exactly these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral

from clipray.config.errors import brief, brief_list

SEVERITIES = (1, 2, 3, 4, 5)
# The package refuses smaller images (its own documented minimum); we keep its contract.
MIN_SIDE = 32

# Order and split exactly as imagecorruptions' corruption_tuple (15 ImageNet-C + 4 extra).
COMMON = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
GROUPS: Mapping[str, tuple[str, ...]] = {"common": COMMON, "extra": EXTRA, "all": COMMON + EXTRA}
# ImageNet-C's four families of the common corruptions (Hendrycks & Dietterich, 2019), and the
# 4 extra ones as a family of their own: held out, a confirmation set for what the common show.
FAMILIES: Mapping[str, tuple[str, ...]] = {
    "noise": COMMON[0:3],
    "blur": COMMON[3:7],
    "weather": COMMON[7:11],
    "digital": COMMON[11:15],
    "extra": EXTRA,
}
NAMES = COMMON + EXTRA
# Corruptions whose output does not depend on the seed (they draw no random numbers).
DETERMINISTIC = frozenset(
    {
        "defocus_blur",
        "zoom_blur",
        "brightness",
        "contrast",
        "pixelate",
        "jpeg_compression",
        "gaussian_blur",
        "saturate",
    }
)


def _known() -> str:
    return f"known corruptions: {brief_list(NAMES, 6)}; groups: {', '.join(GROUPS)}"


def check_name(name: str) -> str:
    """`name` if it is a known corruption, else ValueError listing the known names."""
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown corruption {brief(name, 60)}; {_known()}")
    return name


def resolve_corruptions(spec: Sequence[str]) -> list[str]:
    """Expand group names, validate corruption names, dedupe keeping first occurrence."""
    if isinstance(spec, str):
        raise ValueError(f"corruption spec must be a list of names, got the string {brief(spec)}")
    out: list[str] = []
    for item in spec:
        names = GROUPS.get(item) or (check_name(item),)
        out.extend(name for name in names if name not in out)
    return out


def check_severity(severity: int) -> int:
    """`severity` as int if it is one of SEVERITIES, else ValueError."""
    if (
        isinstance(severity, bool)
        or not isinstance(severity, Integral)
        or int(severity) not in SEVERITIES
    ):
        raise ValueError(f"severity must be an integer in {SEVERITIES}, got {brief(severity, 40)}")
    return int(severity)
