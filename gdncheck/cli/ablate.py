"""``gdncheck ablate``."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gdncheck.cli import app, command, say
from gdncheck.cli.common import backend_specs, resolve_device, writable_dir
from gdncheck.data.errors import UsageError


@command(app, "ablate")
def ablate_cmd(
    beta_quant: Annotated[bool, typer.Option("--beta-quant", help="beta rounded (to --beta-dtype) vs fp32")] = False,
    beta_dtype: Annotated[str, typer.Option(help="dtype of --beta-quant: bf16 or fp16")] = "bf16",
    exp_precision: Annotated[bool, typer.Option("--exp-precision", help="exp(g) in bf16 vs fp32")] = False,
    state_dtype: Annotated[bool, typer.Option("--state-dtype", help="bf16 vs fp32 state")] = False,
    gate_source: Annotated[bool, typer.Option("--gate-source", help="in-kernel gating from raw inputs vs precomputed g, beta")] = False,
    l2norm: Annotated[bool, typer.Option("--l2norm", help="q/k L2 norm precomputed (rounded to the input dtype) vs in kernel")] = False,
    fast_math: Annotated[bool, typer.Option("--fast-math", help="fast exp/log (FLA_USE_FAST_OPS=1; twins' knob)")] = False,
    suite: Annotated[Optional[list[str]], typer.Option("--suite", "-s", help="suite name or TOML path (repeatable)")] = None,
    backend: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="backend spec (repeatable)")] = None,
    seeds: Annotated[int, typer.Option(help="seeds per case (paired units per case)")] = 3,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("runs/ablate"),
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default cuda when present")] = None,
    vocab: Annotated[int, typer.Option(help="width of the logit projection for argmax flips")] = 32768,
    boot: Annotated[int, typer.Option(help="bootstrap resamples")] = 2000,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    jobs: Annotated[int, typer.Option("--jobs", "-j",
                                      help="worker processes (kernels compile in parallel; one GPU is shared)")] = 1,
) -> None:
    """Measure what a rounding choice does: both arms on the same cases and seeds, effect with a 95% CI."""
    from rich.console import Console

    from gdncheck.ablate import SWITCH_NAMES, ablate, make_switch, table, write_report
    from gdncheck.suites import load_suite

    chosen = [n for n, on in zip(SWITCH_NAMES, (beta_quant, exp_precision, state_dtype, gate_source,
                                                  l2norm, fast_math)) if on]
    if not chosen:
        raise UsageError("ablate: name at least one switch (" + ", ".join("--" + s for s in SWITCH_NAMES) + ")")
    if seeds < 1 or vocab < 2 or boot < 100:
        raise UsageError("ablate: --seeds >= 1, --vocab >= 2, --boot >= 100")
    if jobs < 1:
        raise UsageError(f"ablate: --jobs must be >= 1, got {jobs}")
    try:
        switches = [make_switch(n, beta_dtype if n == "beta-quant" else None) for n in chosen]
    except ValueError as e:
        raise UsageError(str(e)) from None
    device = resolve_device(device)
    specs = backend_specs(backend, device)
    suites = suite or ["smoke"]
    cases = [c for s in suites for c in load_suite(s)]
    writable_dir(out)

    def after(r, sw, spec):  # a partial report survives a killed run
        say(f"{sw} on {spec}: done ({r.wall_s:.0f} s)")
        write_report(r, out)

    res = ablate(switches, cases, specs, device=device, seeds=seeds, vocab=vocab, n_boot=boot,
                 suites=suites, progress=progress, after=after, jobs=jobs)
    Console(width=None if sys.stdout.isatty() else 100).print(table(res))
    for g in res.groups:
        print("- " + g["verdict"])
    for s in res.skipped:
        print(f"not run: {s['switch']} on {s['backend']}: {s['status']} ({s['units']} units): {s['reason']}")
    paths = write_report(res, out)
    say("report: " + ", ".join(str(p) for p in paths))
