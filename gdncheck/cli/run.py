"""``gdncheck run``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gdncheck.cli import app, command, say
from gdncheck.cli.common import backend_specs, judge_and_render, parse_shard, resolve_device


@command(app, "run")
def run_cmd(
    suite: Annotated[Optional[list[str]], typer.Option("--suite", "-s", help="suite name or TOML path (repeatable); default smoke")] = None,
    backend: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="name, entry point or package.module:factory (repeatable)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory (default runs/<run id>; runs/latest points at it)")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default cuda when present")] = None,
    isolate: Annotated[Optional[bool], typer.Option("--isolate/--no-isolate", help="worker processes (default on CUDA)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out (only if its fingerprint matches)")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the run in --out")] = False,
    shard: Annotated[Optional[str], typer.Option(help="run shard i/n of the pairs")] = None,
    seeds: Annotated[int, typer.Option(help="run every case under this many seeds (seed + 1009 i)")] = 1,
    budgets: Annotated[Optional[list[Path]], typer.Option("--budgets", help="TOML merged over the shipped budgets (repeatable)")] = None,
    render: Annotated[bool, typer.Option("--render/--no-render", help="render report.md/html, junit.xml, summary.json")] = True,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="exit 0 rather than 3 when nothing was judged")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="worker processes side by side on the device")] = 1,
    sanitize: Annotated[Optional[str], typer.Option("--sanitize", help="each case in its own process under compute-sanitizer --tool memcheck|initcheck|racecheck|synccheck")] = None,
) -> None:
    """Run suites x backends against the float64 oracle and judge them (exit 0 pass, 1 fail, 2 usage, 3 nothing judged)."""
    from gdncheck.budgets import load_budgets
    from gdncheck.run import run

    b = load_budgets(budgets or [])
    device = resolve_device(device)
    specs = backend_specs(backend, device)
    outcome = run(suite or ["smoke"], specs, out, device=device, isolate=isolate, resume=resume,
                  overwrite=overwrite, shard=parse_shard(shard), progress=progress, jobs=jobs, seeds=seeds, budgets=b,
                  sanitize=sanitize)
    say(f"run {outcome.header.run_id}: {outcome.ran} results in {outcome.wall_s:.1f} s -> {outcome.dir.results}")
    code, _ = judge_and_render(outcome.dir.results, outcome.dir.path, b, render=render, allow_empty=allow_empty)
    raise typer.Exit(code)
