"""PGD against its noise control: the study's own question, tested directly.

"Distinguishable from the baseline" for PGD and "not" for noise is two tests, not a comparison.
Here every PGD arm is compared with the noise arm that has the same other values (tower, layer,
epsilon, ...), paired by seed and by query exactly as an arm is compared with the baseline
(:func:`clipray.analysis.stats.bootstrap` with the noise arm in the baseline's place), and Holm's
correction runs across these contrasts, per endpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from clipray.analysis import document as doc
from clipray.analysis.results import BASELINE_ARM, Trial
from clipray.analysis.stats import Design, bootstrap, holm

KIND = "perturb.kind"


def twins(trials: Sequence[Trial]) -> list[tuple[str, str]]:
    """(PGD arm, its noise arm) for every PGD arm whose control was run."""
    params = {t.arm: t.params for t in trials if t.arm != BASELINE_ARM}  # epsilon 0: no kind
    out = []
    for arm, p in params.items():
        if p.get(KIND) == "pgd":
            twin = {**p, KIND: "noise"}
            out += [(arm, other) for other, q in params.items() if q == twin][:1]
    return out


def _pair(design: Design, noise: str, pgd: str) -> Design:
    rows = [design.arms.index(noise), design.arms.index(pgd)]
    owners = design.text_to_image
    return Design(
        (noise, pgd), design.seeds, design.endpoints, design.i2t[rows], design.t2i[rows],
        design.present[rows], owners,
    )  # fmt: skip


def contrast_section(
    design: Design, trials: Sequence[Trial], resamples: int, seed: int, alpha: float
) -> list[doc.Block]:
    """A table of PGD minus noise per endpoint, with intervals and Holm-adjusted verdicts."""
    pairs = twins(trials)
    if not pairs:
        return []
    results = [bootstrap(_pair(design, n, p), True, resamples, alpha, seed) for p, n in pairs]
    change = np.array([[r.change[1], r.low[1], r.high[1]] for r in results])  # (pairs, 3, ends)
    p_holm = np.stack([holm(col) for col in np.array([r.p[1] for r in results]).T], axis=1)
    header = ["PGD arm (vs its noise control)", *design.endpoints]
    rows = []
    for i, (pgd, _) in enumerate(pairs):
        cells = []
        for e in range(len(design.endpoints)):
            star = " *" if not math.isnan(p_holm[i, e]) and p_holm[i, e] < alpha else ""
            cells.append(doc.interval(*change[i, :, e], signed=True) + star)
        rows.append([pgd, *cells])
    return [
        doc.heading("PGD against its noise control"),
        doc.text(
            "RSUM of each PGD arm minus that of the noise arm with the same tower, layer and "
            "epsilon (the random perturbation of the same size), paired by seed and query, with "
            "95 % intervals; * distinguishable (Holm across these contrasts, per endpoint). This "
            "is the study's question: does the adversary do more than noise of its size?"
        ),
        doc.table(header, rows),
    ]
