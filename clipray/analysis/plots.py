"""The report's figures, each as PNG bytes (matplotlib's Agg backend: no display needed).

Small on purpose (~100 dpi, a few inches): they are inlined in a self-contained HTML page and
committed with a study. Bands and error bars are the bootstrap's 95 % intervals
(:mod:`clipray.analysis.stats`); a figure whose data is absent comes back as None.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipray.analysis.results import BASELINE_ARM, CLEAN, CORRUPTED, EPSILON, LABELS
from clipray.analysis.stats import Effects, pareto_front

DPI = 100  # small PNGs: ~30-80 kB each
KIND = "perturb.kind"  # pgd (the adversary) or noise (the control): line style
NOISE_STYLE = "--"
LEGEND_COLUMNS = 3
EPSILON_TICKS = 6  # up to this many measured epsilons label the axis themselves
MARKERS = {  # the Pareto plot's points by kind of arm
    "baseline": {"fmt": "*", "ms": 9, "color": "k"},
    "pgd": {"fmt": "o", "ms": 4, "color": "tab:blue"},
    "noise": {"fmt": "s", "ms": 4, "color": "tab:orange"},
}


@contextmanager
def _figure(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(*args, **kwargs)
    try:
        yield fig, ax
    finally:
        plt.close(fig)


def _png(fig: Any, bottom: float = 0.0) -> bytes:
    fig.tight_layout(rect=(0, bottom, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def epsilon_ticks(epsilons: Iterable[float]) -> list[float]:
    """Where a log epsilon axis is labelled: at the measured values when they are few (up to
    ``EPSILON_TICKS``) and evenly enough spread for their labels not to collide (a study's
    grid), else at that many log-spaced, 2-digit points across them (a searched range). The
    default log ticks label only powers of ten, so a range under a decade had no labels."""
    values = sorted({float(e) for e in epsilons if e > 0})
    logs = [math.log10(v) for v in values]
    span = logs[-1] - logs[0] if values else 0.0
    gaps = [b - a for a, b in zip(logs, logs[1:], strict=False)]
    if len(values) <= EPSILON_TICKS and all(g >= span / EPSILON_TICKS for g in gaps):
        return values
    points = np.linspace(logs[0], logs[-1], EPSILON_TICKS)
    return list(dict.fromkeys(float(f"{10**x:.2g}") for x in points))


def _epsilon_axis(ax: Any, epsilons: list[float]) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter("")  # log-scale minor labels overlap
    ticks = epsilon_ticks(epsilons)
    if ticks:
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], fontsize=8)
    ax.set_xlabel("epsilon")


def _groups(effects: Effects, params: Mapping[str, Mapping[str, Any]]) -> dict[str, list[int]]:
    """{line label: arm rows by epsilon}: arms alike in every searched value but epsilon."""
    groups: dict[str, list[int]] = {}
    for i, arm in enumerate(effects.arms):
        values = params.get(arm, {})
        if arm == BASELINE_ARM or not isinstance(values.get(EPSILON), (int, float)):
            continue
        rest = {k.split(".")[-1]: v for k, v in sorted(values.items()) if k != EPSILON}
        label = ", ".join(f"{k}={v}" for k, v in rest.items()) or "perturbed"
        groups.setdefault(label, []).append(i)
    for rows in groups.values():
        rows.sort(key=lambda i: params[effects.arms[i]][EPSILON])
    return groups


def epsilon_curves(effects: Effects, params: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    """Clean and mean corrupted RSUM against epsilon (log scale), one line per combination of
    the other searched values (dashed: the noise control), 95 % bands; the baseline as a band."""
    groups = _groups(effects, params)
    panels = [e for e in (CLEAN, CORRUPTED) if e in effects.endpoints]
    if not groups or not panels:
        return None
    colours = _colours(groups, params, effects)
    measured = [params[effects.arms[i]][EPSILON] for rows in groups.values() for i in rows]
    legend = 0.15 + 0.17 * math.ceil((len(groups) + 1) / LEGEND_COLUMNS)  # inches, below
    height = 3.6 + legend
    with _figure(1, len(panels), figsize=(5.2 * len(panels), height), squeeze=False) as (fig, axes):
        for ax, endpoint in zip(axes[0], panels, strict=True):
            e = effects.endpoints.index(endpoint)
            if BASELINE_ARM in effects.arms:
                b = effects.arms.index(BASELINE_ARM)
                ax.axhspan(effects.level_low[b, e], effects.level_high[b, e], color="0.85")
                ax.axhline(effects.level[b, e], color="0.4", lw=1, label="baseline (epsilon 0)")
            for label, rows in groups.items():
                values = [params[effects.arms[i]] for i in rows]
                _line(ax, effects, (rows, e), values, label, colours[label])
            _epsilon_axis(ax, measured)
            ax.set_ylabel(LABELS[endpoint])
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=LEGEND_COLUMNS, fontsize=7)
        fig.suptitle("RSUM against epsilon (95 % bootstrap bands)", fontsize=10)
        return _png(fig, bottom=legend / height)


def _line(
    ax: Any, effects: Effects, at: tuple[list[int], int], values: list, label: str, colour: Any
) -> None:
    """One line of arms along epsilon: points with 95 % error bars, a band between them;
    dashed with square markers for the noise control."""
    eps = [v[EPSILON] for v in values]
    noise = values[0].get(KIND) == "noise"
    level, low, high = (x[at] for x in (effects.level, effects.level_low, effects.level_high))
    style = {"marker": "s" if noise else "o", "ls": NOISE_STYLE if noise else "-", "ms": 3}
    yerr = np.nan_to_num(np.abs([level - low, high - level]))  # no interval: no bar
    ax.errorbar(eps, level, yerr, capsize=2, elinewidth=0.8, color=colour, label=label, **style)
    if len(eps) > 1:
        ax.fill_between(eps, low, high, color=colour, alpha=0.08, lw=0)


def _colours(
    groups: Mapping[str, list[int]], params: Mapping[str, Mapping[str, Any]], effects: Effects
) -> dict[str, Any]:
    """One colour per line, shared by a PGD line and its noise control (same other values)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    keys: dict[str, int] = {}
    out = {}
    for label, rows in groups.items():
        values = params[effects.arms[rows[0]]]
        key = repr(sorted((k, v) for k, v in values.items() if k not in (EPSILON, KIND)))
        out[label] = cmap(keys.setdefault(key, len(keys)) % 10)
    return out


def change_heatmap(effects: Effects) -> bytes | None:
    """Change against the baseline per arm (rows) and endpoint (columns: clean, mean corrupted,
    each family; extra = the held-out confirmation set), annotated; * = distinguishable."""
    rows = [i for i, a in enumerate(effects.arms) if a != BASELINE_ARM]
    change = effects.change[rows]
    if not rows or np.all(np.isnan(change)):
        return None
    limit = float(np.nanmax(np.abs(change))) or 1.0
    columns = [LABELS.get(e, e).removesuffix(" RSUM") for e in effects.endpoints]
    size = (1.6 + 0.95 * len(columns), 1.4 + 0.32 * len(rows))
    with _figure(figsize=size) as (fig, ax):
        image = ax.imshow(change, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), [effects.arms[i] for i in rows], fontsize=7)
        for r, i in enumerate(rows):
            for c in range(len(columns)):
                star = "*" if effects.distinguishable[i, c] else ""
                value = effects.change[i, c]
                colour = "w" if abs(value) > 0.6 * limit else "k"  # readable on dark cells
                ax.text(
                    c, r, f"{value:+.1f}{star}", ha="center", va="center", fontsize=7, color=colour
                )
        if "extra" in effects.endpoints:
            ax.axvline(effects.endpoints.index("extra") - 0.5, color="k", lw=1.5)
        fig.colorbar(image, ax=ax, label="RSUM change vs baseline")
        ax.set_title("change against the baseline (* distinguishable, Holm)", fontsize=9)
        return _png(fig)


def pareto(effects: Effects, params: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    """Clean against mean corrupted RSUM of every arm (its mean over seeds, 95 % intervals);
    the Pareto front (no arm better in both) joined, numbered and named below the axes."""
    if CLEAN not in effects.endpoints or CORRUPTED not in effects.endpoints:
        return None
    c, k = effects.endpoints.index(CLEAN), effects.endpoints.index(CORRUPTED)
    x, y = effects.level[:, c], effects.level[:, k]
    front = sorted(pareto_front(x, y), key=lambda i: x[i])  # left to right
    listing = 0.1 * (len(front) + 1) + 0.1  # inches below the axes: the front's arms by number
    height = 4.4 + listing
    labelled: set[str] = set()
    with _figure(figsize=(5.6, height)) as (fig, ax):
        for i, arm in enumerate(effects.arms):
            kind = "noise" if params.get(arm, {}).get(KIND) == "noise" else "pgd"
            kind = "baseline" if arm == BASELINE_ARM else kind
            xerr = [[x[i] - effects.level_low[i, c]], [effects.level_high[i, c] - x[i]]]
            yerr = [[y[i] - effects.level_low[i, k]], [effects.level_high[i, k] - y[i]]]
            ax.errorbar(
                x[i], y[i], np.nan_to_num(np.abs(yerr)), np.nan_to_num(np.abs(xerr)),
                elinewidth=0.6, label=kind if kind not in labelled else None, **MARKERS[kind],
            )  # fmt: skip
            labelled.add(kind)
        ax.plot(x[front], y[front], color="tab:red", lw=1, label="Pareto front")
        for n, i in enumerate(front, 1):  # numbers on the plot, names below: long names overlap
            ax.annotate(
                str(n), (x[i], y[i]), xytext=(3, 3), textcoords="offset points", fontsize=7,
                color="tab:red",
            )  # fmt: skip
        names = "\n".join(f"{n}: {effects.arms[i]}" for n, i in enumerate(front, 1))
        fig.text(0.02, 0.01, f"Pareto front, left to right:\n{names}", fontsize=6, va="bottom")
        ax.set_xlabel(LABELS[CLEAN])
        ax.set_ylabel(LABELS[CORRUPTED])
        ax.legend(fontsize=7)
        ax.set_title("clean against corrupted retrieval (arm means)", fontsize=9)
        return _png(fig, bottom=listing / height)


def importance_bars(importances: Mapping[str, Mapping[str, float]]) -> bytes | None:
    """Optuna's parameter importances, one group of bars per target metric."""
    targets = {t: v for t, v in importances.items() if v}
    if not targets:
        return None
    names = sorted({p for v in targets.values() for p in v})
    height = 0.8 / len(targets)
    with _figure(figsize=(5.6, 1.2 + 0.45 * len(names) * len(targets) ** 0.5)) as (fig, ax):
        for j, (target, values) in enumerate(targets.items()):
            positions = np.arange(len(names)) + j * height
            ax.barh(positions, [values.get(n, 0.0) for n in names], height=height, label=target)
        ax.set_yticks(np.arange(len(names)) + height * (len(targets) - 1) / 2, names, fontsize=8)
        ax.set_xlabel("importance (Optuna, normalised)")
        ax.legend(fontsize=7)
        ax.set_title("parameter importances", fontsize=9)
        return _png(fig)


@dataclass(frozen=True)
class Curve:
    """One line of the calibration figure: arms alike but for epsilon, ascending."""

    label: str
    epsilon: tuple[float, ...]
    cost: tuple[float, ...]  # clean RSUM cost, % of the baseline's (NaN: no baseline)
    gap: tuple[float, ...]  # train/adv_loss - train/clean_loss (NaN: not recorded)
    noise: bool  # the noise control: dashed, square markers
    colour_key: str  # lines with the same key share a colour (a PGD line and its control)


def calibration_curves(curves: list[Curve], top: float) -> bytes | None:
    """Clean cost in % against epsilon (log x; dotted at 0 and ``top`` %) and, when recorded,
    the loss gap against epsilon; one line per curve."""
    import matplotlib

    panels = [
        (name, label)
        for name, label in (
            ("cost", "clean RSUM cost (% of baseline)"),
            ("gap", "loss gap: adv - clean (final epoch)"),
        )
        if any(math.isfinite(v) for c in curves for v in getattr(c, name))  # else no panel
    ]
    if not panels:
        return None
    keys = list(dict.fromkeys(c.colour_key for c in curves))
    cmap = matplotlib.colormaps["tab10"]
    legend = 0.15 + 0.17 * math.ceil(len(curves) / LEGEND_COLUMNS)  # inches, below
    height = 3.2 + legend
    size = (4.4 * len(panels), height)
    with _figure(1, len(panels), figsize=size, squeeze=False) as (fig, axes):
        for ax, (field, name) in zip(axes[0], panels, strict=True):
            for c in curves:
                style = {"marker": "s" if c.noise else "o", "ls": NOISE_STYLE if c.noise else "-"}
                colour = cmap(keys.index(c.colour_key) % 10)
                ax.plot(c.epsilon, getattr(c, field), ms=3, color=colour, label=c.label, **style)
            if field == "cost":
                for level in (0.0, top):
                    ax.axhline(level, color="0.5", lw=0.8, ls=":")
            _epsilon_axis(ax, [e for c in curves for e in c.epsilon])
            ax.set_ylabel(name, fontsize=8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=LEGEND_COLUMNS, fontsize=7)
        fig.suptitle("Calibration: clean cost and loss increase against epsilon", fontsize=10)
        return _png(fig, bottom=legend / height)
