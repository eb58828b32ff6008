"""``gdncheck gate``."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from gdncheck.cli import app, command, say
from gdncheck.cli.common import backend_specs, parse_shard, resolve_device


def _kill_table(budgets, seeds: int, device: str, out: Path, progress: bool) -> int:
    from gdncheck.gate import kill_table
    from gdncheck.judge import fmt

    rows, twin, alarms = kill_table(budgets, seeds=seeds, device=device, progress=progress)
    say("planted faults: killed by the gate?")
    for r in rows + ([twin] if twin else []):
        is_twin = r is twin
        ok = (not r.killed) if is_twin else r.killed
        mark = ("pass" if ok else "FALSE ALARM") if is_twin else ("killed" if ok else "NOT KILLED")
        w = r.worst
        worst = (f"{w.case}: {w.check} {fmt(w.value)} / {fmt(w.limit)}" if w and w.kind == "budget"
                 else f"{w.case}: {w.check}" if w else "-")
        say(f"  {r.fault}: {mark}, {r.failed}/{r.cases} cases failed; by {', '.join(r.by) or '-'}; worst {worst}")
    missed = [r.fault for r in rows if not r.killed]
    out.mkdir(parents=True, exist_ok=True)
    (out / "kill_table.json").write_text(json.dumps(
        {"faults": [{**asdict(r), "worst": r.worst.model_dump(mode="json") if r.worst else None} for r in rows],
         "clean_twin": {**asdict(twin), "worst": twin.worst.model_dump(mode="json") if twin.worst else None}
         if twin else None, "missed": missed, "false_alarms": len(alarms)}, indent=1, default=str) + "\n")
    code = 1 if missed or alarms else 0
    say(f"kill table: {'PASS' if code == 0 else 'FAIL'} (exit {code}): {len(rows) - len(missed)} of {len(rows)} faults "
        f"killed, {len(alarms)} false alarms over {seeds} seeds; {out / 'kill_table.json'}")
    return code


@command(app, "gate")
def gate_cmd(
    tier: Annotated[str, typer.Option(help="suite tier: smoke, full or sanitize")] = "smoke",
    suite: Annotated[Optional[list[str]], typer.Option("--suite", "-s", help="suites instead of the tier (repeatable)")] = None,
    backend: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="backends (repeatable); default per device")] = None,
    budgets: Annotated[Optional[list[Path]], typer.Option("--budgets", help="TOML merged over the shipped budgets (repeatable)")] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="results file (.jsonl, .jsonl.gz) of an earlier run to compare with")] = None,
    regress_factor: Annotated[float, typer.Option(help="fail when a budgeted metric grows by more than this")] = 1.5,
    min_overlap: Annotated[float, typer.Option(help="refuse a baseline sharing less than this fraction of the judged pairs")] = 0.5,
    shard: Annotated[Optional[str], typer.Option(help="run shard i/n of the tier")] = None,
    gpus: Annotated[str, typer.Option(help="'auto' or N: one process per GPU, each a shard, then merge")] = "auto",
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="worker processes per GPU (kernels compile in parallel)")] = 1,
    seeds: Annotated[Optional[int], typer.Option(help="seeds per case (default 1; --kill-table: seeds of the clean twin, default 20)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="directory: results.jsonl, gate.json, gate.md (default runs/<run id>)")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default cuda when present")] = None,
    require: Annotated[Optional[list[str]], typer.Option("--require", help="backend that must be available and run (repeatable)")] = None,
    results: Annotated[Optional[Path], typer.Option("--results", help="judge this results file (e.g. merged shards); run nothing")] = None,
    kill_table_: Annotated[bool, typer.Option("--kill-table", help="run the planted faults and the clean twin instead")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out (fingerprint must match)")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the run in --out")] = False,
    allow_empty: Annotated[bool, typer.Option("--allow-empty", help="exit 0 rather than 3 when nothing was judged")] = False,
    judge_: Annotated[bool, typer.Option("--judge/--no-judge", hidden=True)] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Pre-merge precision gate: run a tier, judge budgets, contracts, evidence and a baseline. Exit 0/1/2/3."""
    from gdncheck.budgets import load_budgets
    from gdncheck.gate import TIERS, gate
    from gdncheck.data.errors import UsageError
    from gdncheck.report.verdict import verdict_markdown, verdict_text

    from gdncheck.cli.common import writable_dir

    b = load_budgets(budgets or [])
    if out is not None:
        writable_dir(out)
    if kill_table_:
        raise typer.Exit(_kill_table(b, seeds or 20, device or "cpu",
                                     out or Path("runs/kill-table"), progress))
    if suite:
        suites = list(suite)
    elif tier in TIERS:
        suites = TIERS[tier]
    else:
        raise UsageError(f"--tier: unknown tier {tier!r}; known: {', '.join(TIERS)}")
    sh = parse_shard(shard)
    if results is None:
        device = resolve_device(device)
        specs = backend_specs(backend, device)
    else:
        specs = []
    o = gate(suites, specs, b, out, baseline=baseline, factor=regress_factor, min_overlap=min_overlap, shard=sh,
             gpus=gpus, jobs=jobs, device=device or "cpu", require=list(require or []), results=results,
             resume=resume, overwrite=overwrite, progress=progress, allow_empty=allow_empty, seeds=seeds or 1,
             judge=judge_)
    if not judge_:
        raise typer.Exit(0)
    v = o.verdict
    where = (out or o.results.parent)
    where.mkdir(parents=True, exist_ok=True)
    extra = {"suites": suites, "results": str(o.results), "budgets": b.files,
             "baseline": str(baseline) if baseline else None, "shard": shard, "jobs": jobs, "wall_s": o.wall_s}
    (where / "gate.json").write_text(json.dumps({**extra, **v.model_dump(mode="json")}, indent=1) + "\n")
    (where / "gate.md").write_text(verdict_markdown(v, title="gdncheck precision gate"))
    say(verdict_text(v, title="gate"))
    say(f"verdict: {where / 'gate.json'}, {where / 'gate.md'}")
    raise typer.Exit(v.exit_code)
