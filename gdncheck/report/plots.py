"""Matplotlib figures (Agg) for reports and drift runs; every figure carries its title as its name."""
from __future__ import annotations

import base64
import io
import math
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gdncheck.data.results import CaseResult  # noqa: E402
from gdncheck.report.summary import TENSORS, group_key  # noqa: E402


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def close(fig) -> None:
    plt.close(fig)


def _fig(w: float, h: float, bottom: float = 0.17):
    # fixed margins instead of bbox_inches="tight": a third faster per figure
    fig, ax = plt.subplots(figsize=(w, h))
    fig.subplots_adjust(left=0.14, right=0.97, top=0.9, bottom=bottom)
    return fig, ax


def to_base64(fig, dpi: int = 72) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _log10(v: float) -> float:
    return math.log10(max(v, 1e-3)) if math.isfinite(v) else 6.0  # inf floors drawn at 1e6


def error_figures(results: list[CaseResult]) -> list[tuple[str, object]]:
    """One histogram of log10(in_floors) per (backend, op, dtype) with o / state / intermediate,
    plus an overview of o's in_floors by backend and op."""
    groups: dict[tuple, list[CaseResult]] = defaultdict(list)
    for r in results:
        if r.metrics:
            groups[group_key(r)].append(r)
    figs = []
    over: dict[str, list[float]] = defaultdict(list)
    for (backend, op, dtype), rs in sorted(groups.items()):
        title = f"error distribution: {backend} / {op} / {dtype}"
        fig, ax = _fig(5.5, 2.8)
        for t in TENSORS:
            vals = [_log10(r.metrics[t].in_floors) for r in rs if t in r.metrics and r.metrics[t].in_floors is not None]
            if vals:
                ax.hist(vals, bins=30, histtype="step", linewidth=1.5, label=f"{t} (n={len(vals)})")
            if t == "o":
                over[f"{backend}\n{op}"] += vals
        ax.axvline(0, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("log10(rel_l2 / rounding floor)")
        ax.set_ylabel("cases")
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        figs.append((title, fig))
    if over:
        title = "overview: output error in rounding floors by backend and op"
        keys = sorted(over)
        fig, ax = _fig(max(6, 0.9 * len(keys)), 3.5, bottom=0.3)
        ax.boxplot([over[k] or [0.0] for k in keys], showfliers=True)
        ax.set_xticks(range(1, len(keys) + 1), keys, fontsize=7, rotation=30)
        ax.set_ylabel("log10(in_floors) of o")
        ax.set_title(title, fontsize=9)
        figs.insert(0, (title, fig))
    return figs


def drift_figures(drift) -> list[tuple[str, object]]:
    """Figures of a :class:`gdncheck.drift.DriftResult`: position curves per (T, dtype), rollout
    state / output error curves per state dtype."""
    figs = []
    pos: dict[tuple, list] = defaultdict(list)
    for c in drift.position:
        if c.status == "ok":
            pos[(c.T, c.case.dtype if c.case else "?")].append(c)
    for (T, dtype), cs in sorted(pos.items()):
        title = f"position error: T={T} {dtype}"
        fig, ax = _fig(6, 3.2)
        for c in cs:
            mids = [(lo + hi) / 2 for lo, hi in zip(c.bin_edges[:-1], c.bin_edges[1:])]
            fr = "" if c.flip_rate is None else f", flips {c.flip_rate:.2%}"
            ax.plot(mids, c.rel_l2, marker=".", label=f"{c.backend}{fr}")
        c0 = cs[0]
        mids = [(lo + hi) / 2 for lo, hi in zip(c0.bin_edges[:-1], c0.bin_edges[1:])]
        ax.plot(mids, c0.floor_rel_l2, color="gray", linestyle=":", label="rounding floor")
        ax.set_yscale("log")
        ax.set_xlabel("token position")
        ax.set_ylabel("output rel_l2 per bin")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        figs.append((title, fig))
    roll: dict[str, list] = defaultdict(list)
    for c in drift.rollout:
        if c.status == "ok":
            roll[c.state_dtype].append(c)
    for sd, cs in sorted(roll.items()):
        for what, attr in (("state", "state_rel_l2"), ("output", "o_rel_l2")):
            title = f"rollout {what} error: state {sd}"
            fig, ax = _fig(6, 3.2)
            for c in cs:
                g = c.growth if what == "state" else c.growth_o
                gs = "" if g is None else f", growth {g:.2f}"
                ax.plot(c.log_steps, getattr(c, attr), marker=".", label=f"{c.backend}{gs}")
            if what == "state":
                ax.plot(cs[0].log_steps, cs[0].state_floor, color="gray", linestyle=":", label="one rounding")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("decode step")
            ax.set_ylabel(f"{what} rel_l2 vs float64")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
            figs.append((title, fig))
    return figs
