"""Human-readable views of scoring results: tables and the corruption x severity heatmap.

Pure functions of the flat metric dicts that scoring returns (keys built by
:mod:`clipray.core.metrics`); used by ``clipray score`` and the sweep's MLflow artifacts
and summary.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from clipray.core.metrics import agg_key, cell_table, clean_key


def rsum_table(flat: Mapping[str, float], metric: str = "rsum") -> str:
    """Markdown table: one row per corruption, one column per severity, plus the mean."""
    corruptions, severities, rows = cell_table(flat, metric)
    head = ["corruption", *[f"s{s}" for s in severities], "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in zip(corruptions, rows, strict=True):
        cells = [f"{v:.1f}" for v in row]
        finite = [v for v in row if not math.isnan(v)]
        mean = sum(finite) / len(finite) if finite else math.nan
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.1f} |")
    return "\n".join(lines)


SUMMARY_KEYS = (
    ("clean rsum", clean_key("rsum")),
    ("mean corrupted rsum", agg_key("mean_corrupted_rsum")),
    ("relative robustness", agg_key("relative_robustness")),
    ("mmi (mean relative drop)", agg_key("mmi")),
    ("mCE vs baseline", agg_key("mce")),
    ("relative mCE vs baseline", agg_key("relative_mce")),
)


def summary_lines(flat: Mapping[str, float]) -> list[str]:
    """One line per headline number, with its metric key (as in MLflow and the README)."""
    return [f"{label} ({key}): {flat[key]:.3f}" for label, key in SUMMARY_KEYS if key in flat]


def csv_table(flat: Mapping[str, float]) -> str:
    """Every metric of the result, one ``key,value`` line each (sorted), for spreadsheets."""
    return "key,value\n" + "".join(f"{k},{v!r}\n" for k, v in sorted(flat.items()))


def _cell(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trials_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown table of a sweep's trials: one row each, ``columns`` as (header, key)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k, "")) for _, k in columns) + " |")
    return "\n".join(lines)


def trials_csv(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """The same rows as CSV, full precision, one column per key."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(keys), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def heatmap_png(flat: Mapping[str, float], metric: str = "rsum", title: str = "") -> bytes:
    """PNG of the corruption x severity grid of ``metric``, annotated with values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corruptions, severities, rows = cell_table(flat, metric)
    size = (max(5.5, 3.0 + 0.9 * len(severities)), max(2.6, 1.1 + 0.38 * len(corruptions)))
    fig, ax = plt.subplots(figsize=size)
    try:
        image = ax.imshow(rows, cmap="viridis", aspect="auto", vmin=0)
        ax.set_xticks(range(len(severities)), [f"severity {s}" for s in severities])
        ax.set_yticks(range(len(corruptions)), corruptions)
        for i, row in enumerate(rows):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="w", fontsize=8)
        clean = flat.get(clean_key(metric))
        label = f"{metric} (clean {clean:.0f})" if clean is not None else metric
        fig.colorbar(image, ax=ax, label=label)
        ax.set_title(title or f"retrieval {metric} under corruption")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        return buf.getvalue()
    finally:
        plt.close(fig)
