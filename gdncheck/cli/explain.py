"""``gdncheck explain A B``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gdncheck.cli import app, command, say
from gdncheck.cli.common import resolve_device
from gdncheck.data.errors import EnvironmentProblem, UsageError


@command(app, "explain")
def explain_cmd(
    a: Annotated[str, typer.Argument(help="backend spec (twin knobs as twin-fla[beta_dtype=bfloat16]) or a --save directory")],
    b: Annotated[Optional[str], typer.Argument(help="the other kernel; omit with --save to only save A's outputs")] = None,
    suite: Annotated[Optional[list[str]], typer.Option("--suite", "-s", help="suite name or TOML path (repeatable); default: small built-in cases")] = None,
    case: Annotated[Optional[list[str]], typer.Option("--case", help="case id or name (repeatable)")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="seeds per case")] = 1,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default cuda when present")] = None,
    out: Annotated[Optional[Path], typer.Option(help="write explain.json, explain.md, explain.html here")] = None,
    save: Annotated[Optional[Path], typer.Option(help="save each live backend's outputs under DIR/<name>-<version>")] = None,
    head_dim: Annotated[Optional[int], typer.Option("--head-dim", help="K = V of the built-in cases (default 32 on CPU, 128 on CUDA)")] = None,
) -> None:
    """Why do two kernels differ? Attribute their gap to rounding choices via precision twins."""
    from gdncheck.explain import (_unavailable, default_cases, explain, open_side, replicate, save_outputs,
                                  saved_cases)
    from gdncheck.report.explain import render_all, terminal
    from gdncheck.suites import load_suite

    dev = resolve_device(device)
    if b is None and save is None:
        raise UsageError("explain needs two kernels (A B), or one with --save DIR")
    sides = [open_side(s) for s in (a, b) if s is not None]
    for s in sides:
        why = _unavailable(s)
        if why:
            raise EnvironmentProblem(f"{s.name} is not available here: {why}")
    # cases
    if suite:
        cases = [c for s in suite for c in load_suite(s)]
    elif any(s.saved is not None for s in sides):
        cases = saved_cases(next(s for s in sides if s.saved is not None))
    else:
        hd = head_dim or (128 if dev.startswith("cuda") else 32)
        cases = default_cases(hd, hd)
    if case:
        want = set(case)
        cases = [c for c in cases if c.id in want or (c.name or "") in want]
        found = {c.id for c in cases} | {c.name for c in cases}
        missing = sorted(want - found)
        if missing:
            raise UsageError(f"--case: no case {missing[0]!r} in the chosen cases")
    if seeds > 1 and not any(s.saved is not None for s in sides):
        cases = replicate(cases, seeds)
    if save is not None:
        for i, s in enumerate(sides):
            if s.backend is not None:
                d = save / f"{s.name}-{s.version}".replace("/", "_").replace(":", "_")
                idx = save_outputs(s, cases, d, device=dev)
                n = sum(e["status"] == "ok" for e in idx["cases"].values())
                say(f"saved {n} of {len(cases)} cases of {s.name} to {d}")
                sides[i] = open_side(str(d))  # explain from what was saved: each case runs once
        if b is None:
                raise typer.Exit(0)
    ex = explain(sides[0], sides[1], cases, device=dev)
    terminal(ex)
    if out is not None:
        paths = render_all(ex, out)
        say("report: " + ", ".join(str(p) for p in paths))
    if ex.verdict == "nothing compared":
        raise EnvironmentProblem("nothing was compared: neither kernel ran a case the other ran")
