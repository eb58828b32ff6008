"""Render an :class:`~gdncheck.explain.Explanation`: terminal (rich, 80 columns), Markdown,
self-contained HTML (one matplotlib figure per pair, inlined as PNG) and JSON."""
from __future__ import annotations

import html as _html
import sys
from pathlib import Path

from gdncheck.explain import CHANNEL_NAMES, KNOB_GRID, Explanation


def _f(v, spec: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and v != v:
        return "nan"
    return format(v, spec)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _knobs(k: dict) -> str:
    """Knobs that differ from the FLA family default, ``k=v`` comma separated."""
    diff = [f"{n}={v}" for n, v in k.items() if v != KNOB_GRID[n][0]]
    return ", ".join(diff) or "FLA defaults"


def _channel_rows(ex: Explanation) -> list[list[str]]:
    rows = []
    for c, s in ex.channels.items():
        rows.append([CHANNEL_NAMES[c], s.dtype, _f(s.ab_floors), _f(s.a_floors), _f(s.b_floors),
                     _pct(s.identical), _pct(s.within_1ulp),
                     _pct(None if s.share is None else max(0.0, s.share))])
    return rows


_CH_HEAD = ["channel", "dtype", "A-B fl", "A-or fl", "B-or fl", "A=B", "<=1ulp", "explained"]


def _where_lines(ex: Explanation) -> list[str]:
    w = ex.where
    out = []
    if w.tokens_differing is not None:
        out.append(f"output tokens with any A-B difference: {_pct(w.tokens_differing)}")
    if w.heads:
        worst = sorted(range(len(w.heads)), key=lambda i: -w.heads[i])[:4]
        out.append("A-B per value head (floors): " + ", ".join(f"h{i} {_f(w.heads[i])}" for i in worst)
                   + (" (worst 4)" if len(w.heads) > 4 else ""))
    if w.bins_ab:
        out.append("A-B by position (floors): " + ", ".join(
            f"{w.bin_edges[i]}-{w.bin_edges[i + 1] - 1}: {_f(v)}" for i, v in enumerate(w.bins_ab)))
    if w.growth is not None:
        trend = "grows with position" if w.growth > 0.3 else ("shrinks with position" if w.growth < -0.3 else "flat in position")
        out.append(f"growth exponent {w.growth:+.2f}: {trend}")
    return out


def terminal(ex: Explanation, file=None) -> None:
    """Print the summary; plain text (no markup or ANSI codes) when not a TTY, 80 columns wide."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    f = file or sys.stdout
    tty = hasattr(f, "isatty") and f.isatty()
    con = Console(file=f, width=80, highlight=False, markup=False, emoji=False,
                  force_terminal=tty, no_color=not tty)
    con.print(Text(f"explain  A = {ex.a} {ex.a_version}   B = {ex.b} {ex.b_version}", style="bold"))
    n, k = len(ex.cases), len(ex.skipped)
    con.print(f"{n} cases compared" + (f", {k} skipped (not run by both)" if k else ""))
    style = {"explained": "green", "no difference": "green", "partly explained": "yellow"}.get(ex.verdict, "red")
    con.print(Text(f"verdict: {ex.verdict}", style=f"bold {style}"))
    con.print(ex.summary)
    if ex.channels:
        t = Table(show_edge=False, pad_edge=False, box=None)
        for h in _CH_HEAD:
            t.add_column(h, justify="left" if h in ("channel", "dtype") else "right")
        for r in _channel_rows(ex):
            t.add_row(*r)
        con.print(t)
    for line in _where_lines(ex):
        con.print(line)
    for tag, fit in (("A", ex.fit_a), ("B", ex.fit_b)):
        if fit is not None:
            con.print(f"best twin of {tag}: {_knobs(fit.knobs)}")
            con.print(f"  output: {_pct(fit.identical)} bit-identical, {_pct(fit.within_1ulp)} within 1 ulp, "
                      f"residual {_f(fit.residual_floors)} floors")
    if ex.not_observable:
        con.print("fits differ but no case shows it: " + ", ".join(ex.not_observable))
    for s in ex.skipped[:5]:
        con.print(f"skipped {s.label}: {s.reason}"[:200])
    if len(ex.skipped) > 5:
        con.print(f"... {len(ex.skipped) - 5} more skipped")
    f.flush()


def markdown(ex: Explanation) -> str:
    L = [f"# explain: `{ex.a}` vs `{ex.b}`", "",
         f"A = `{ex.a}` {ex.a_version}, B = `{ex.b}` {ex.b_version}, device {ex.device or 'cpu'}, "
         f"{len(ex.cases)} cases compared, {len(ex.skipped)} skipped.", "",
         f"**Verdict: {ex.verdict}.** {ex.summary}", ""]
    if ex.switches:
        L += ["| switch | A | B | explains alone | |", "|---|---|---|---|---|"]
        L += [f"| {s['knob']} | {s['a']} | {s['b']} | {_pct(None if s.get('share_alone') is None else max(0.0, s['share_alone']))} "
              f"| {s['phrase']} |" for s in ex.switches]
        L.append("")
    if ex.channels:
        L += ["| " + " | ".join(_CH_HEAD) + " |", "|" + "---|" * len(_CH_HEAD)]
        L += ["| " + " | ".join(r) + " |" for r in _channel_rows(ex)]
        L += ["", "Floors: rel-L2 over the oracle's norm divided by the oracle rounded once to the channel's "
              "dtype. *explained*: 1 - ||(A-B) - (twinA - twinB)||^2 / ||A-B||^2 (share of the gap's squared norm).", ""]
    L += [f"- {line}" for line in _where_lines(ex)]
    L.append("")
    for tag, fit in (("A", ex.fit_a), ("B", ex.fit_b)):
        if fit is not None:
            L.append(f"- best twin of {tag}: `{_knobs(fit.knobs)}` (search from {fit.start}, {fit.evaluations} "
                     f"configurations): output bit-identical {_pct(fit.identical)}, within 1 ulp "
                     f"{_pct(fit.within_1ulp)}, residual {_f(fit.residual_floors)} floors")
    if ex.not_observable:
        L.append(f"- fits differ but no case shows it: {', '.join(ex.not_observable)}")
    L += ["", f"Search: {ex.search}.", ""]
    if ex.cases:
        L += ["| case | op | dtype | state | out A-B fl | out A=B | state A-B fl | inter A-B fl |",
              "|---|---|---|---|---|---|---|---|"]
        for r in ex.cases:
            o, s, i = (r.channels.get(c) for c in ("o", "state", "intermediate"))
            L.append(f"| {r.label} | {r.op} | {r.dtype} | {r.state_dtype} | {_f(o and o.ab_floors)} | "
                     f"{_pct(o and o.identical)} | {_f(s and s.ab_floors)} | {_f(i and i.ab_floors)} |")
    if ex.skipped:
        L += ["", "Skipped:", ""] + [f"- {s.label}: {s.reason}" for s in ex.skipped]
    return "\n".join(L) + "\n"


def figure(ex: Explanation):
    """One figure per pair: A-B, A-oracle, B-oracle by position bin; A-B per value head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = ex.where
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    fig.subplots_adjust(left=0.08, right=0.98, top=0.85, bottom=0.18, wspace=0.3)
    if w.bins_ab:
        x = [(w.bin_edges[i] + w.bin_edges[i + 1] - 1) / 2 for i in range(len(w.bins_ab))]
        ax1.plot(x, w.bins_ab, "o-", label="A-B")
        ax1.plot(x, w.bins_a, "s--", label="A-oracle")
        ax1.plot(x, w.bins_b, "^--", label="B-oracle")
        ax1.set_xlabel("position in sequence (token)")
        ax1.set_ylabel("output, floors")
        ax1.legend(fontsize=7)
    if w.heads:
        ax2.bar(range(len(w.heads)), w.heads)
        ax2.set_xlabel("value head")
        ax2.set_ylabel("A-B output, floors")
    fig.suptitle(f"{ex.a} vs {ex.b}: {ex.verdict}", fontsize=9)
    return fig


def html_page(ex: Explanation) -> str:
    from gdncheck.report.plots import to_base64
    from gdncheck.report.render import _md_table_to_html

    png = to_base64(figure(ex))
    body = _md_table_to_html(markdown(ex))
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>explain {_html.escape(ex.a)} vs {_html.escape(ex.b)}</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
            f"</head><body>{body}<img alt='A-B by position and head' src='data:image/png;base64,{png}'>"
            "</body></html>")


def render_all(ex: Explanation, out: Path) -> list[Path]:
    """Write ``explain.json``, ``explain.md``, ``explain.html`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "explain.json", out / "explain.md", out / "explain.html"]
    paths[0].write_text(ex.model_dump_json(indent=1))
    paths[1].write_text(markdown(ex))
    paths[2].write_text(html_page(ex))
    return paths
