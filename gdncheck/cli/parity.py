"""``gdncheck parity --engine E``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gdncheck.cli import app, command, say
from gdncheck.cli.common import resolve_device
from gdncheck.data.errors import EnvironmentProblem, UsageError


@command(app, "parity")
def parity_cmd(
    engine: Annotated[list[str], typer.Option("--engine", "-e", help="sglang or vllm (repeatable)")],
    suite: Annotated[Optional[list[str]], typer.Option("--suite", "-s", help="suite name or TOML path (repeatable); default smoke")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default cuda when present")] = None,
    out: Annotated[Path, typer.Option(help="write ENGINE/parity.jsonl and ENGINE/parity.md here")] = Path("runs/parity"),
) -> None:
    """An engine's Triton path against its FlashInfer path on identical inputs, in floors."""
    from gdncheck.engine_parity import PAIRS, run
    from gdncheck.suites import load_suite

    bad = [e for e in engine if e not in PAIRS]
    if bad:
        raise UsageError(f"--engine {bad[0]!r}: known engines are {', '.join(sorted(PAIRS))}")
    suites = suite or ["smoke"]
    for s in suites:
        load_suite(s)  # a wrong suite is one line before any kernel runs
    dev = resolve_device(device)
    ran = 0
    for e in engine:
        rows = run(e, suites, dev, out / e)
        ran += sum("o" in r for r in rows)
        print((out / e / "parity.md").read_text())
    say(f"report: {', '.join(str(out / e / 'parity.md') for e in engine)}")
    if not ran:
        raise EnvironmentProblem("nothing was compared: no case ran on both paths of any pair here "
                                 "(the FlashInfer paths need CUDA and flashinfer)")
