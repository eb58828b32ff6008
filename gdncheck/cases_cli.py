"""Commands ``gdncheck cases list|show``, ``gdncheck fuzz`` and ``gdncheck repro``.

Exit codes: 0 pass, 1 a failing case, 2 bad input (suite file, case spec, option), 3 environment
(backend unavailable here).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

EXIT_FAIL, EXIT_USAGE, EXIT_ENV = 1, 2, 3


def _usage(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(EXIT_USAGE)


def _suite_cases(suites: list[str]):
    from gdncheck.cases import SuiteError, list_suites, load_suite
    out = []
    try:
        for s in suites or list_suites():
            out += [(s, c) for c in load_suite(s)]
    except SuiteError as e:
        raise _usage(str(e)) from None
    return out


def _backend(spec: str):
    from gdncheck.backends import BackendNotFound, load_backend
    try:
        return load_backend(spec)
    except BackendNotFound as e:
        raise _usage(str(e)) from None
    except (TypeError, ValueError) as e:
        raise _usage(f"backend {spec!r}: {e}") from None


def _dtype_short(d: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[d]


def cases_list(
    suite: Annotated[Optional[list[str]], typer.Argument(help="suite names or TOML paths (default: all)")] = None,
    tag: Annotated[Optional[str], typer.Option(help="only cases carrying this tag")] = None,
    op: Annotated[Optional[str], typer.Option(help="only this op")] = None,
) -> None:
    """Table of the cases in SUITE: id, name, op, N, T, H/HV, K/V, dtypes, pool, padding."""
    from rich.console import Console
    from rich.table import Table

    rows = [(s, c) for s, c in _suite_cases(suite or []) if (tag is None or tag in c.tags)
            and (op is None or c.op == op)]
    t = Table(title=f"{len(rows)} cases", show_lines=False)
    for col in ("id", "name", "op", "N", "T", "H/HV", "K/V", "dtypes", "layout", "pool", "padding"):
        t.add_column(col, no_wrap=col != "name", overflow="fold")
    for _, c in rows:
        dt = f"{_dtype_short(c.dtype)}/{_dtype_short(c.state_dtype)}"
        pool = "-" if c.pool_size is None else f"P={c.pool_size}" + (" strided" if c.pool_strided else "")
        pad = str(len(c.padded_rows)) if c.padded_rows else "-"
        t.add_row(c.id, c.name or "", c.op, str(c.N), str(c.T), f"{c.H}/{c.HV}", f"{c.K}/{c.V}", dt,
                  c.layout, pool, pad)
    Console(width=max(160, Console().width), soft_wrap=False).print(t)


def cases_show(
    case_id: Annotated[str, typer.Argument(help="case id, id prefix, name, or case JSON")],
    results: Annotated[Optional[Path], typer.Option(help="also search this results JSONL")] = None,
    digest: Annotated[bool, typer.Option("--digest", help="materialise the inputs and print their digest")] = False,
) -> None:
    """One case as JSON, with its derived sizes and repro line."""
    from gdncheck.cases import SuiteError, inputs_digest, materialize
    from gdncheck.repro import ReproError, find_case
    try:
        c = find_case(case_id, results)
    except (ReproError, SuiteError) as e:
        raise _usage(str(e)) from None
    typer.echo(c.model_dump_json(indent=2))
    typer.echo(f"id {c.id}  N={c.N} B={c.B} T={c.T} HS={c.HS} padded rows={c.padded_rows or '-'}")
    if digest:
        typer.echo(f"inputs digest {inputs_digest(materialize(c))}")
    typer.echo(c.repro())


def fuzz_cmd(
    backend: Annotated[str, typer.Option("--backend", "-b", help="backend name, entry point or package.module:factory")],
    examples: Annotated[Optional[int], typer.Option("--examples", "-n", help="examples (default: the profile's)")] = None,
    profile: Annotated[Optional[str], typer.Option(help="dev, ci or nightly (default: $GDNCHECK_PROFILE, ci under $CI, else dev)")] = None,
    op: Annotated[Optional[list[str]], typer.Option("--op", help="ops to draw (repeatable; default all the backend runs)")] = None,
    max_tokens: Annotated[int, typer.Option(help="bound on tokens per case")] = 160,
    max_batch: Annotated[int, typer.Option(help="bound on sequences per case")] = 8,
    dims: Annotated[Optional[list[int]], typer.Option("--dim", help="K/V values to draw (repeatable)")] = None,
    device: Annotated[Optional[str], typer.Option(help="default: the backend's device")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Hypothesis seed")] = None,
) -> None:
    """Fuzz one backend with Hypothesis against the oracle; a failure is shrunk and printed as a repro line."""
    from gdncheck.fuzz import fuzz
    from gdncheck.strategies import DIMS, OPS, profile_name

    b = _backend(backend)
    why = b.available()
    if why:
        typer.echo(f"error: backend {backend} unavailable: {why}", err=True)
        raise typer.Exit(EXIT_ENV)
    try:
        profile_name(profile)
        kw = dict(ops=tuple(op or OPS), max_tokens=max_tokens, max_batch=max_batch, dims=tuple(dims or DIMS))
        rep = fuzz(b, max_examples=examples, profile=profile, device=device, seed=seed, **kw)
    except ValueError as e:
        raise _usage(str(e)) from None
    if not rep.ok:
        raise typer.Exit(EXIT_FAIL)


def _print_result(r, digest: str) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(140, Console().width))
    head = f"[bold]{r.backend}[/bold] {r.status}"
    if r.reason:
        head += f": {r.reason}"
    if r.path:
        head += f"  path={r.path}"
    if r.policy:
        head += f"  padding={r.policy}"
    con.print(head + f"  digest={digest}")
    if r.metrics:
        t = Table()
        for col in ("tensor", "count", "rel_l2", "floor", "x floor", "x twin", "max_abs", "ulp p99", "ulp max", "nan"):
            t.add_column(col, justify="right")
        f = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
        for k, m in r.metrics.items():
            t.add_row(k, str(m.count), f(m.rel_l2), f(m.floor_rel_l2), f(m.in_floors), f(m.in_twins),
                      f(m.max_abs), f(m.ulp_p99), f(m.ulp_max), str(m.nan))
        con.print(t)
    if r.contracts is not None and not r.contracts.ok:
        con.print(f"[red]contracts:[/red] {r.contracts.model_dump(exclude_defaults=True)}")


def repro_cmd(
    case: Annotated[Optional[str], typer.Argument(help="case id, id prefix, name, or case JSON")] = None,
    backend: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="backend(s) to run (repeatable; default: the CPU twins)")] = None,
    results: Annotated[Optional[Path], typer.Option(help="also search this results JSONL for the case id")] = None,
    save: Annotated[Optional[Path], typer.Option(help="write a bundle (case.json, inputs.safetensors, README) here")] = None,
    load: Annotated[Optional[Path], typer.Option(help="reproduce from a bundle instead of the generator")] = None,
    device: Annotated[Optional[str], typer.Option(help="device of the inputs (default: cuda for CUDA backends, else cpu)")] = None,
    twin: Annotated[bool, typer.Option("--twin/--no-twin", help="judge against the backend's precision twin")] = True,
    sanitize: Annotated[Optional[str], typer.Option("--sanitize", help="run each backend in its own process under compute-sanitizer --tool memcheck|initcheck|racecheck|synccheck")] = None,
) -> None:
    """Rebuild one case's inputs, print their digest, run backends and print metrics."""
    from gdncheck.backends import load_backend
    from gdncheck.cases import SuiteError, inputs_digest, materialize
    from gdncheck.fuzz import judge
    from gdncheck.repro import ReproError, find_case, load_bundle, run_inputs, save_bundle

    if (case is None) == (load is None):
        raise _usage("give a CASE (id, name or JSON) or --load DIR, not both")
    specs = backend or ["twin-fla", "twin-flashinfer"]
    backends = [_backend(s) for s in specs]
    dev = device or ("cuda" if any(b.caps.device.startswith("cuda") for b in backends) else "cpu")
    if sanitize:  # the child process builds the inputs
        try:
            found = find_case(case, results) if case is not None else None
        except (ReproError, SuiteError) as e:
            raise _usage(str(e)) from None
        _repro_sanitized(found, specs, sanitize, dev, save, load)
        return
    try:
        inputs = load_bundle(load, dev) if load is not None else materialize(find_case(case, results), dev)
    except (ReproError, SuiteError) as e:
        raise _usage(str(e)) from None
    c = inputs.case
    digest = inputs_digest(inputs)
    typer.echo(f"case {c.id} {c.name or ''}  op={c.op} N={c.N} T={c.T} H/HV={c.H}/{c.HV} K/V={c.K}/{c.V}")
    typer.echo(f"inputs digest {digest}")
    if save is not None:
        typer.echo(f"bundle: {save_bundle(inputs, save)}")
    failed = False
    for b in backends:
        tw = None
        if twin and b.twin and b.twin != b.name:
            try:
                tw = load_backend(b.twin)
            except Exception:  # noqa: BLE001 - no twin: judge by floors
                tw = None
        r, _ = run_inputs(b, inputs, twin=tw)
        _print_result(r, digest)
        why = judge(r)
        if why:
            typer.echo(f"FAIL {b.name}: {why}")
            failed = True
    if failed:
        raise typer.Exit(EXIT_FAIL)


def _repro_sanitized(case, specs: list[str], tool: str, device: str, save, load) -> None:
    """``repro --sanitize``: each backend in its own process under compute-sanitizer; prints the
    parsed findings; exit 1 on any error the tool counted, 3 when the tool is missing."""
    from gdncheck import sanitize as S

    if load is not None or save is not None:
        raise _usage("--sanitize rebuilds the case from its id in the child process: not with --load/--save")
    try:
        S.require(tool)
    except ValueError as e:
        raise _usage(str(e)) from None
    except S.SanitizerMissing as e:
        typer.echo(f"environment: {e}", err=True)
        raise typer.Exit(EXIT_ENV) from None
    failed = False
    for spec in specs:
        r = S.sanitize_case(spec, case, tool, device=device)
        s = r.sanitizer
        typer.echo(f"{r.backend}: status {r.status}; {tool}: {s.errors} errors, {s.warnings} warnings"
                   + (f" ({s.summary})" if s.summary else ""))
        for f in s.findings:
            typer.echo(f"  [{f.severity}] {f.summary()}")
        if s.errors or r.status in ("error", "crash", "nan"):
            failed = True
            typer.echo(f"FAIL {r.backend}: {r.repro}")
    if failed:
        raise typer.Exit(EXIT_FAIL)


def register(app: typer.Typer) -> None:
    """Add ``cases list|show``, ``fuzz`` and ``repro`` to ``app``."""
    cases_app = typer.Typer(help="List and inspect case suites.", no_args_is_help=True)
    cases_app.command("list")(cases_list)
    cases_app.command("show")(cases_show)
    app.add_typer(cases_app, name="cases")
    app.command("fuzz")(fuzz_cmd)
    app.command("repro")(repro_cmd)
