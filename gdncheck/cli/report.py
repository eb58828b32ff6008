"""``gdncheck report render|compare|matrix|merge``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from gdncheck.cli import app, command, say

rep = typer.Typer(help="Reports of a results file, run comparison, capability matrix, shard merging.",
                  no_args_is_help=True)
app.add_typer(rep, name="report")


@command(rep, "render")
def render_cmd(
    results: Annotated[Path, typer.Argument(help="results file (.jsonl, .jsonl.gz)")],
    out: Annotated[Path, typer.Option("--out", help="output directory")] = Path("report"),
    drift: Annotated[Optional[list[Path]], typer.Option("--drift", help="drift JSON (gdncheck drift ...), repeatable")] = None,
    budgets: Annotated[Optional[list[Path]], typer.Option("--budgets", help="TOML merged over the shipped budgets")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="skip matplotlib figures")] = False,
    step_summary: Annotated[bool, typer.Option(help="append report.md to $GITHUB_STEP_SUMMARY when set")] = True,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="exit 0 rather than 3 when nothing was judged")] = False,
) -> None:
    """Judge a results file and write summary.json, report.md, report.html, junit.xml, verdict.json (exit = the verdict's)."""
    from gdncheck.budgets import load_budgets
    from gdncheck.cli.common import judge_and_render, writable_dir
    from gdncheck.data.drift import load_drift

    b = load_budgets(budgets or [])
    writable_dir(out)
    code, r = judge_and_render(results, out, b, drift=[load_drift(p) for p in drift or []], plots=not no_plots,
                               allow_empty=allow_empty, title="report")
    gh = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary and gh:
        with open(gh, "a") as f:
            f.write(r.files["markdown"].read_text())
    raise typer.Exit(code)


@command(rep, "compare")
def compare_cmd(
    a: Annotated[Path, typer.Argument(help="baseline results file")],
    b: Annotated[Path, typer.Argument(help="new results file")],
    factor: Annotated[float, typer.Option(help="a budgeted metric growing by more than this is a regression")] = 1.5,
    min_overlap: Annotated[float, typer.Option(help="refuse runs sharing less than this fraction of judged pairs")] = 0.5,
    budgets: Annotated[Optional[list[Path]], typer.Option("--budgets", help="TOML merged over the shipped budgets")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the comparison verdict as JSON")] = None,
    limit: Annotated[int, typer.Option(help="rows per list")] = 20,
) -> None:
    """Judge B against baseline A with the gate's rule: exit 1 on regressions, new failures or missing pairs."""
    from gdncheck.budgets import load_budgets
    from gdncheck.data.io import load_results
    from gdncheck.judge import judge_run
    from gdncheck.report.verdict import verdict_text

    bud = load_budgets(budgets or [])
    ha, ra = load_results(a)
    hb, rb = load_results(b)
    v = judge_run(rb, bud, planned=hb.planned, shards=hb.shards, baseline=ra, baseline_path=str(a),
                  baseline_env=ha.environment.model_dump(exclude_none=True, include={"gpu", "flashinfer", "fla"}),
                  factor=factor, min_overlap=min_overlap)
    say(f"compare: baseline {ha.run_id} ({ha.environment.flashinfer or '-'} flashinfer) -> {hb.run_id} "
        f"({hb.environment.flashinfer or '-'} flashinfer)")
    say(verdict_text(v, limit=limit, title="compare"))
    if json_out:
        json_out.write_text(v.model_dump_json(indent=1) + "\n")
    raise typer.Exit(v.exit_code)


@command(rep, "matrix")
def matrix_cmd(
    results: Annotated[list[Path], typer.Argument(help="results files (several: one matrix over all)")],
    budgets: Annotated[Optional[list[Path]], typer.Option("--budgets", help="TOML merged over the shipped budgets")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="write matrix.md and matrix.json into this directory")] = None,
) -> None:
    """Capability matrix (backend x feature: ok / unsupported with reason / wrong), judged by the judge."""
    from gdncheck.budgets import load_budgets
    from gdncheck.data.io import load_results
    from gdncheck.judge import judge_result
    from gdncheck.report import matrix

    bud = load_budgets(budgets or [])
    order, rs = [], []
    for path in results:
        header, part = load_results(path)
        order += header.backends
        rs += part
    m = matrix.build(rs, lambda r: judge_result(r, bud), order)
    md = matrix.markdown(m)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "matrix.md").write_text(md)
        (out / "matrix.json").write_text(json.dumps(m, indent=1) + "\n")
        say(f"wrote {out / 'matrix.md'}, {out / 'matrix.json'}")
    else:
        print(md)


@command(rep, "merge")
def merge_cmd(
    shards: Annotated[list[Path], typer.Argument(help="results files: every shard i/n of one run, once each")],
    out: Annotated[Path, typer.Option("--out", help="merged results file")],
) -> None:
    """Join the shards of one run (refuses a missing, repeated or foreign shard); judge with `gate --results`."""
    from gdncheck.data.io import merge_results, write_results

    header, rs = merge_results(shards)
    write_results(out, header, rs)
    planned = len(header.planned) if header.planned is not None else "an unrecorded number of"
    say(f"merged {len(shards)} shards: {len(rs)} results of {planned} planned pairs -> {out}")
