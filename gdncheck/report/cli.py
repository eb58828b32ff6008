"""``gdncheck report render|compare|matrix|merge``."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gdncheck.report.io import ResultsError, load_results, merge_results, write_results

console = Console(width=None if sys.stdout.isatty() else 160)  # logs: no truncated columns


def _f(v, spec=".3g") -> str:
    if v is None:
        return "–"
    return "inf" if isinstance(v, float) and math.isinf(v) else format(v, spec)


def _load(path: Path):
    try:
        return load_results(path)
    except ResultsError as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        raise typer.Exit(2) from None


def summary_table(summary: dict) -> Table:
    tab = Table(title=f"run {summary['run_id']}: in rounding floors, median / max")
    for c in ("backend", "op", "dtype", "pass", "fail", "unsup", "err/nan/crash", "o", "state", "inter"):
        tab.add_column(c, justify="right" if c not in ("backend", "op", "dtype") else "left")
    for g in summary["groups"]:
        c = g["counts"]
        st = lambda s: "–" if not s else f"{_f(s['median'])} / {_f(s['max'])}"  # noqa: E731
        tab.add_row(g["backend"], g["op"], g["dtype"], str(c["pass"]),
                    f"[red]{c['fail']}[/red]" if c["fail"] else "0", str(c["unsupported"]),
                    f"{c['error']}/{c['nan']}/{c['crash']}", st(g["o"]), st(g["state"]), st(g["intermediate"]))
    return tab


def register(app: typer.Typer) -> None:
    """Add ``gdncheck report render|compare|matrix|merge`` to a typer app."""
    rep = typer.Typer(help="Summaries, HTML/Markdown/JUnit reports, run comparison and shard merging.",
                      no_args_is_help=True)
    app.add_typer(rep, name="report")

    @rep.command("render")
    def render_cmd(
        results: Path = typer.Argument(..., help="results JSONL"),
        drift: list[Path] = typer.Option([], "--drift", help="drift JSON (gdncheck drift ...), repeatable"),
        out: Path = typer.Option(Path("report"), "--out", help="output directory"),
        no_plots: bool = typer.Option(False, "--no-plots", help="skip matplotlib figures"),
        step_summary: bool = typer.Option(True, help="append report.md to $GITHUB_STEP_SUMMARY when set"),
    ):
        """Write summary.json, report.md, report.html and junit.xml."""
        from gdncheck.drift import load_drift
        from gdncheck.report.render import render

        header, rs = _load(results)
        drifts = [load_drift(p) for p in drift]
        r = render(header, rs, out, drift=drifts, plots=not no_plots)
        console.print(summary_table(r.summary))
        t = r.summary["totals"]
        console.print(f"{t['passed']} passed, [red]{t['fail']} failed[/red], {t['unsupported']} unsupported "
                      f"of {t['cases']}; {len(r.figures)} plots")
        for k, p in r.files.items():
            console.print(f"wrote {p}")
        gh = os.environ.get("GITHUB_STEP_SUMMARY")
        if step_summary and gh:
            with open(gh, "a") as f:
                f.write(r.files["markdown"].read_text())

    @rep.command("compare")
    def compare_cmd(
        a: Path = typer.Argument(..., help="baseline results JSONL"),
        b: Path = typer.Argument(..., help="new results JSONL"),
        factor: float = typer.Option(2.0, help="in_floors ratio B/A counted as a regression"),
        min_floors: float = typer.Option(1.0, help="in_floors below this count as this (noise floor)"),
        json_out: Path | None = typer.Option(None, "--json", help="write the comparison as JSON"),
        limit: int = typer.Option(20, help="rows per table"),
    ):
        """Per-metric deltas, new and fixed failures; exit 1 on regressions beyond --factor or new failures."""
        from gdncheck.report.compare import compare

        (ha, ra), (hb, rb) = _load(a), _load(b)
        cmp = compare(ra, rb, factor=factor, min_floors=min_floors)
        tab = Table(title=f"median in_floors: {ha.run_id} -> {hb.run_id}")
        for c in ("backend", "op", "dtype", "fail A", "fail B", "o A", "o B", "state A", "state B"):
            tab.add_column(c)
        for g in cmp["groups"]:
            tab.add_row(g["backend"], g["op"], g["dtype"], str(g["fail_a"]), str(g["fail_b"]),
                        _f(g["o"]["a"]), _f(g["o"]["b"]), _f(g["state"]["a"]), _f(g["state"]["b"]))
        console.print(tab)
        if cmp["regressions"]:
            rt = Table(title=f"regressions (ratio > {factor})")
            for c in ("backend", "case", "tensor", "A", "B", "ratio"):
                rt.add_column(c)
            for x in cmp["regressions"][:limit]:
                rt.add_row(x["backend"], x["name"] or x["case_id"], x["tensor"], _f(x["a"]), _f(x["b"]), _f(x["ratio"]))
            console.print(rt)
        for title, rows in (("new failures", cmp["new_failures"]), ("fixed failures", cmp["fixed_failures"])):
            if rows:
                ft = Table(title=title)
                for c in ("backend", "case", "failure"):
                    ft.add_column(c)
                for x in rows[:limit]:
                    ft.add_row(x["backend"], x["name"] or x["case_id"], x["failure"] or "")
                console.print(ft)
        console.print(f"pairs {cmp['pairs']}, only in A {cmp['only_a']}, only in B {cmp['only_b']}; "
                      f"identical {cmp['identical']}, largest in_floors ratio {cmp['max_spread']:.4g}; "
                      f"{len(cmp['regressions'])} regressions, {len(cmp['new_failures'])} new failures, "
                      f"{len(cmp['fixed_failures'])} fixed")
        if json_out:
            json_out.write_text(json.dumps(cmp, indent=1))
        raise typer.Exit(1 if cmp["regressed"] else 0)

    @rep.command("matrix")
    def matrix_cmd(
        results: list[Path] = typer.Argument(..., help="results JSONL (several: one matrix over all)"),
        budgets: list[Path] = typer.Option([], "--budgets", help="TOML merged over the shipped budgets (repeatable)"),
        out: Path | None = typer.Option(None, "--out", help="write matrix.md and matrix.json into this directory"),
    ):
        """Capability matrix (backend x feature: ok / unsupported with reason / wrong), judged by the gate;
        backend columns in the order of the runs' headers."""
        from gdncheck.gate import GateConfigError, judge, load_budgets
        from gdncheck.report import matrix

        try:
            b = load_budgets(budgets)
        except GateConfigError as e:
            console.print(f"[red]error:[/red] {e}", soft_wrap=True)
            raise typer.Exit(2) from None
        order, rs = [], []
        for path in results:
            header, part = _load(path)
            order += header.backends
            rs += part
        m = matrix.build(rs, lambda r: judge(r, b), order)
        md = matrix.markdown(m)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "matrix.md").write_text(md)
            (out / "matrix.json").write_text(json.dumps(m, indent=1) + "\n")
            console.print(f"wrote {out / 'matrix.md'}, {out / 'matrix.json'}")
        else:
            print(md)

    @rep.command("merge")
    def merge_cmd(
        shards: list[Path] = typer.Argument(..., help="results JSONL shards"),
        out: Path = typer.Option(..., "--out", help="merged results JSONL"),
    ):
        """Join shards of one run into one results file (errors on schema-version mismatch)."""
        try:
            header, rs = merge_results(shards)
        except ResultsError as e:
            console.print(f"[red]error:[/red] {e}", soft_wrap=True)
            raise typer.Exit(2) from None
        write_results(out, header, rs)
        console.print(f"merged {len(shards)} shards, {len(rs)} results -> {out}")
