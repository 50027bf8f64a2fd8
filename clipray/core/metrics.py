"""Image-text retrieval metrics and their corruption-robustness aggregates (pure, torch + stdlib).

Retrieval, ``retrieval_recall``
    Similarity is the dot product: pass L2-normalised embeddings to get cosine similarity.
    i2t (image->text): the query is an image; a hit at K if ANY of its captions is in the top K.
    t2i (text->image): the query is a caption; its one positive image is ``text_to_image[j]``.
    Recalls are percent (0-100); ``rsum`` is the sum of all reported recalls (0-600 for ks=1,5,10).
    Ties: candidates are ordered by score descending, then index ascending, so a candidate ranks
    above the positive iff its score is strictly greater, or equal with a lower index. This does
    not depend on a sort implementation; CLIP / CLIP_benchmark use ``torch.topk``, whose order among
    equal scores is implementation-defined. For i2t the rank is that of the best-ranked caption.
    Keys (MLflow forbids '@', so Recall@K is R{K}): i2t_R1 i2t_R5 i2t_R10 t2i_R1 t2i_R5 t2i_R10 rsum

Aggregates over corruption cells (cell = one (corruption, severity)), ``corruption_summary``
    E = 1 - rsum / rsum_max (600) is the retrieval error of a cell, E_clean that of the clean set.
    A ratio with a zero denominator is NaN (never inf or 0), and a NaN propagates into the means.
    mean_rsum/<c>        mean rsum over the severities of corruption c
    mean_corrupted_rsum  mean rsum over all cells
    relative_robustness  mean_corrupted_rsum / clean rsum (fraction; NaN if clean rsum is 0)
    mmi                  mean over cells of (clean rsum - rsum) / clean rsum (fraction, MMI-style
                         mean relative drop, = 1 - relative_robustness; NaN if clean rsum is 0)
    Only with a reference model on the same cells (in a sweep: the epsilon=0 baseline trial),
    in percent as ImageNet-C reports them (100 = exactly as robust as the reference):
    ce/<c>               100 * sum_s E[c,s] / sum_s Eref[c,s]                  (NaN if den. = 0)
    mce                  mean over corruptions of ce/<c>
    relative_ce/<c>      100 * sum_s (E[c,s] - E_clean) / sum_s (Eref[c,s] - Eref_clean)
                         (NaN if den. <= 0: the reference is not degraded, the ratio is meaningless)
    relative_mce         mean over corruptions of relative_ce/<c>

Flat keys, for MLflow / Tune / tables (build them only with the functions below):
    clean/<metric>   corrupt/<corruption>/s<severity>/<metric>   agg/<summary key>
Names are [A-Za-z0-9_.-]+ (MLflow-safe) and severities non-negative ints.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from numbers import Integral, Real

import torch
from torch import Tensor

Cell = tuple[str, int]
DEFAULT_KS = (1, 5, 10)  # the Flickr30k / MSCOCO reporting standard used by CLIP and CLIP_benchmark
RSUM_MAX = 600.0  # 2 directions x 3 recalls x 100 %: the range of rsum for DEFAULT_KS
_BLOCK_ELEMENTS = 2**20  # scores per chunk (4 MiB f32): as fast as 2**22 on 5k x 25k, less memory
_NAME = r"[A-Za-z0-9_.-]+"
_CELL_KEY = re.compile(rf"corrupt/({_NAME})/s(\d+)/({_NAME})")


# ---------------------------------------------------------------- keys (the only place formatting)
def recall_key(direction: str, k: int) -> str:
    """'i2t_R5' for direction 'i2t' and k=5."""
    return f"{direction}_R{k}"


def retrieval_keys(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """The keys of :func:`retrieval_recall`'s result, in its order."""
    return [recall_key(d, k) for d in ("i2t", "t2i") for k in ks] + ["rsum"]


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(_NAME, value):
        raise ValueError(f"{what} must be a non-empty string of [A-Za-z0-9_.-], got {value!r}")
    return value


def _severity(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"severity must be a non-negative int, got {value!r}")
    return int(value)


def per_corruption_key(stat: str, corruption: str) -> str:
    """'<stat>/<corruption>', e.g. 'mean_rsum/fog', a per-corruption summary key."""
    return f"{_name(stat, 'stat')}/{_name(corruption, 'corruption')}"


def clean_key(metric: str) -> str:
    return f"clean/{_name(metric, 'metric')}"


def cell_key(corruption: str, severity: int, metric: str) -> str:
    """'corrupt/<corruption>/s<severity>/<metric>', e.g. 'corrupt/fog/s3/rsum'."""
    name, sev = _name(corruption, "corruption"), _severity(severity)
    return f"corrupt/{name}/s{sev}/{_name(metric, 'metric')}"


def agg_key(name: str) -> str:
    """'agg/<name>' for a key of ``corruption_summary`` (which may hold one '/')."""
    for part in name.split("/"):
        _name(part, "summary key part")
    return f"agg/{name}"


def parse_cell_key(key: str) -> tuple[str, int, str] | None:
    """(corruption, severity, metric) of a ``cell_key``, or None for any other key."""
    match = _CELL_KEY.fullmatch(key)
    return (match[1], int(match[2]), match[3]) if match else None


# ---------------------------------------------------------------- retrieval
def _describe(x: object) -> str:
    return f"{x.dtype} tensor {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_embeddings(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> None:
    for what, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(emb, Tensor) or emb.ndim != 2 or not emb.is_floating_point():
            raise ValueError(
                f"{what} must be a 2-D float tensor [count, dim], got {_describe(emb)}"
            )
        if emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"{what} must be non-empty, got shape {tuple(emb.shape)}")
        if not torch.isfinite(emb).all():
            raise ValueError(f"{what} contains NaN or inf")
    if image_emb.device != text_emb.device:
        raise ValueError(f"image_emb on {image_emb.device} but text_emb on {text_emb.device}")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"image_emb dim {image_emb.shape[1]} != text_emb dim {text_emb.shape[1]}")
    if (
        not isinstance(text_to_image, Tensor)
        or text_to_image.dtype == torch.bool
        or text_to_image.is_floating_point()
        or text_to_image.is_complex()
        or tuple(text_to_image.shape) != (text_emb.shape[0],)
    ):
        raise ValueError(
            f"text_to_image must be an int tensor of shape ({text_emb.shape[0]},), "
            f"got {_describe(text_to_image)}"
        )
    n_images = image_emb.shape[0]
    if text_to_image.min() < 0 or text_to_image.max() >= n_images:
        raise ValueError(
            f"text_to_image values must be in [0, {n_images}), got "
            f"[{int(text_to_image.min())}, {int(text_to_image.max())}]"
        )
    orphans = (torch.bincount(text_to_image.cpu(), minlength=n_images) == 0).nonzero().flatten()
    if len(orphans):
        raise ValueError(
            f"{len(orphans)} images have no caption (image->text recall undefined), "
            f"first: {orphans[:5].tolist()}"
        )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if not ks or bad or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct ints >= 1, got {ks!r}")
    return ks


def _best_positive_rank(scores: Tensor, positive: Tensor) -> Tensor:
    """0-based rank per row of its best positive under the (score desc, index asc) order."""
    cols = torch.arange(scores.shape[1], device=scores.device, dtype=torch.int32)
    best = scores.masked_fill(~positive, -math.inf).amax(dim=1, keepdim=True)
    first = torch.where(positive & (scores == best), cols, len(cols)).amin(1, keepdim=True)
    return (scores > best).sum(1) + ((scores == best) & (cols < first)).sum(1)


def _ranks_one_way(
    queries: Tensor, candidates: Tensor, query_ids: Tensor, candidate_ids: Tensor, chunk_size: int
) -> Tensor:
    """Each query's 0-based rank of its best positive (equal id); chunked over queries."""
    out = []
    for start in range(0, queries.shape[0], chunk_size):
        stop = start + chunk_size
        scores = queries[start:stop] @ candidates.T
        positive = query_ids[start:stop, None] == candidate_ids[None, :]
        out.append(_best_positive_rank(scores, positive))
    return torch.cat(out)


def recall_from_ranks(i2t: Tensor, t2i: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """The :func:`retrieval_recall` dict from per-query ranks (what :func:`query_ranks` gives):
    recall@K is the percent of queries whose rank is below K."""
    ks = _check_ks(ks)
    recalls = [100.0 * int((torch.as_tensor(r) < k).sum()) / len(r) for r in (i2t, t2i) for k in ks]
    return dict(zip(retrieval_keys(ks), [*recalls, math.fsum(recalls)], strict=True))


def query_ranks(
    image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """(i2t, t2i): per image, the rank of its best-ranked caption; per caption, the rank of its
    image (0 = top; ties as in :func:`retrieval_recall`). Paired bootstraps resample these."""
    _check_embeddings(image_emb, text_emb, text_to_image)
    dtype = torch.promote_types(torch.promote_types(image_emb.dtype, text_emb.dtype), torch.float32)
    images, texts = image_emb.to(dtype), text_emb.to(dtype)
    text_ids = text_to_image.to(device=images.device, dtype=torch.long)
    image_ids = torch.arange(images.shape[0], device=images.device)
    i2t = _ranks_one_way(
        images, texts, image_ids, text_ids, chunk_size or max(1, _BLOCK_ELEMENTS // len(texts))
    )
    t2i = _ranks_one_way(
        texts, images, text_ids, image_ids, chunk_size or max(1, _BLOCK_ELEMENTS // len(images))
    )
    return i2t.cpu(), t2i.cpu()


def retrieval_recall(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K (percent) both ways plus rsum; keys ``i2t_R{k}``, ``t2i_R{k}``, ``rsum``.

    image_emb [N, D] and text_emb [M, D] are assumed L2-normalised (similarity = dot product);
    text_to_image [M] (int) is each caption's image. i2t: hit if ANY caption of the image is in the
    top K. t2i: one positive image per caption. Ties: a candidate ranks above the positive iff its
    score is strictly greater, or equal with a lower index (deterministic; torch.topk as used by
    CLIP_benchmark orders ties in an implementation-defined way). chunk_size: queries scored per
    block (default: ~2**20 scores per block), so memory stays O(chunk_size * max(N, M)).
    """
    _check_embeddings(image_emb, text_emb, text_to_image)
    ks = _check_ks(ks)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    return recall_from_ranks(*query_ranks(image_emb, text_emb, text_to_image, chunk_size), ks)


# ---------------------------------------------------------------- corruption aggregates
def _rsum(metrics: Mapping[str, float], what: str, rsum_max: float) -> float:
    value = metrics.get("rsum") if isinstance(metrics, Mapping) else None
    if not isinstance(value, Real) or not 0.0 <= value <= rsum_max:  # NaN fails this too
        raise ValueError(f"{what} needs an 'rsum' in [0, {rsum_max}], got {value!r}")
    return float(value)


def _cell_rsums(
    corrupted: Mapping[Cell, Mapping[str, float]], what: str, rsum_max: float
) -> dict[str, dict[int, float]]:
    """{corruption: {severity: rsum}}, corruptions in first-appearance order."""
    if not isinstance(corrupted, Mapping) or not corrupted:
        raise ValueError(f"{what} must be a non-empty mapping {{(corruption, severity): metrics}}")
    grouped: dict[str, dict[int, float]] = {}
    for cell, metrics in corrupted.items():
        if not isinstance(cell, tuple) or len(cell) != 2:
            raise ValueError(f"{what} keys must be (corruption, severity) tuples, got {cell!r}")
        name, sev = _name(cell[0], "corruption"), _severity(cell[1])
        grouped.setdefault(name, {})[sev] = _rsum(metrics, f"{what}[{cell!r}]", rsum_max)
    return grouped


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def corruption_summary(
    clean: Mapping[str, float],
    corrupted: Mapping[Cell, Mapping[str, float]],
    reference_clean: Mapping[str, float] | None = None,
    reference_corrupted: Mapping[Cell, Mapping[str, float]] | None = None,
    rsum_max: float = RSUM_MAX,
) -> dict[str, float]:
    """Robustness aggregates of one model (keys and conventions: module docstring).

    ce/relative_ce/mce/relative_mce need both reference arguments (same cells) and are absent
    without them. rsum_max is the best possible rsum (600 for the default ks).
    """
    clean_rsum = _rsum(clean, "clean", rsum_max)
    rsums = _cell_rsums(corrupted, "corrupted", rsum_max)
    cells = [r for by_sev in rsums.values() for r in by_sev.values()]
    out = {per_corruption_key("mean_rsum", c): _mean(list(s.values())) for c, s in rsums.items()}
    out["mean_corrupted_rsum"] = _mean(cells)
    out["relative_robustness"] = _ratio(out["mean_corrupted_rsum"], clean_rsum)
    out["mmi"] = _mean([_ratio(clean_rsum - r, clean_rsum) for r in cells])
    if reference_clean is None and reference_corrupted is None:
        return out
    if reference_clean is None or reference_corrupted is None:
        raise ValueError("give both reference_clean and reference_corrupted, or neither")
    ref_clean = _rsum(reference_clean, "reference_clean", rsum_max)
    ref = _cell_rsums(reference_corrupted, "reference_corrupted", rsum_max)
    if {c: set(s) for c, s in ref.items()} != {c: set(s) for c, s in rsums.items()}:
        raise ValueError(
            f"reference cells {sorted((c, s) for c in ref for s in ref[c])} != "
            f"model cells {sorted((c, s) for c in rsums for s in rsums[c])}"
        )
    return out | _corruption_errors(clean_rsum, rsums, ref_clean, ref, rsum_max)


def _corruption_errors(
    clean_rsum: float,
    rsums: dict[str, dict[int, float]],
    ref_clean: float,
    ref: dict[str, dict[int, float]],
    rsum_max: float,
) -> dict[str, float]:
    """ce/<c>, relative_ce/<c>, mce and relative_mce against a reference on the same cells."""

    def err(r: float) -> float:
        return 1.0 - r / rsum_max

    out: dict[str, float] = {}
    ces, rel_ces = [], []
    for c, by_sev in rsums.items():
        ces.append(
            100
            * _ratio(
                math.fsum(err(r) for r in by_sev.values()),
                math.fsum(err(r) for r in ref[c].values()),
            )
        )
        rel_den = math.fsum(err(r) - err(ref_clean) for r in ref[c].values())
        rel_num = math.fsum(err(r) - err(clean_rsum) for r in by_sev.values())
        rel_ces.append(100 * rel_num / rel_den if rel_den > 0 else math.nan)
        out[per_corruption_key("ce", c)] = ces[-1]
        out[per_corruption_key("relative_ce", c)] = rel_ces[-1]
    out["mce"] = _mean(ces)
    out["relative_mce"] = _mean(rel_ces)
    return out


# ---------------------------------------------------------------- flat dicts and tables
def flatten_clean(clean: Mapping[str, float]) -> dict[str, float]:
    return {clean_key(m): float(v) for m, v in clean.items()}


def flatten_cell_metrics(corrupted: Mapping[Cell, Mapping[str, float]]) -> dict[str, float]:
    """{'corrupt/<c>/s<sev>/<metric>': value} for every cell and metric."""
    return {cell_key(c, s, m): float(v) for (c, s), ms in corrupted.items() for m, v in ms.items()}


def flatten_summary(summary: Mapping[str, float]) -> dict[str, float]:
    return {agg_key(k): float(v) for k, v in summary.items()}


def unflatten_cell_metrics(flat: Mapping[str, float]) -> dict[Cell, dict[str, float]]:
    """Inverse of ``flatten_cell_metrics``; keys that are not cell keys are ignored."""
    out: dict[Cell, dict[str, float]] = {}
    for key, value in flat.items():
        if (parsed := parse_cell_key(key)) is not None:
            out.setdefault(parsed[:2], {})[parsed[2]] = value
    return out


def cell_table(
    flat: Mapping[str, float], metric: str = "rsum"
) -> tuple[list[str], list[int], list[list[float]]]:
    """(corruptions, severities, rows) of one metric: rows[i][j] is corruption i at severity j.

    Corruptions keep first-appearance order (the producer's, e.g. imagecorruptions' order),
    severities ascend, and a missing cell is NaN (e.g. a failed evaluation), for heatmaps / tables.
    """
    cells = {cell: ms[metric] for cell, ms in unflatten_cell_metrics(flat).items() if metric in ms}
    if not cells:
        raise ValueError(f"no corrupt/<corruption>/s<severity>/{metric} keys in the flat dict")
    corruptions = list(dict.fromkeys(c for c, _ in cells))
    severities = sorted({s for _, s in cells})
    rows = [[cells.get((c, s), math.nan) for s in severities] for c in corruptions]
    return corruptions, severities, rows
