"""``gdncheck cases list|show``, ``gdncheck fuzz`` and ``gdncheck repro``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gdncheck.cli import app, command, say
from gdncheck.data.errors import EnvironmentProblem, UsageError

cases_app = typer.Typer(help="List and inspect case suites.", no_args_is_help=True)
app.add_typer(cases_app, name="cases")

_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@command(cases_app, "list")
def cases_list(
    suite: Annotated[Optional[list[str]], typer.Argument(help="suite names or TOML paths (default: all)")] = None,
    tag: Annotated[Optional[str], typer.Option(help="only cases carrying this tag")] = None,
    op: Annotated[Optional[str], typer.Option(help="only this op")] = None,
) -> None:
    """The cases of SUITE, one line each: id, op, N, T, H/HV, K/V, dtypes, layout, pool, padding, name."""
    from gdncheck.suites import list_suites, load_suite

    n = 0
    for s in suite or list_suites():
        for c in load_suite(s):
            if (tag is not None and tag not in c.tags) or (op is not None and c.op != op):
                continue
            n += 1
            pool = "-" if c.pool_size is None else f"P={c.pool_size}" + ("s" if c.pool_strided else "")
            print(f"{c.id} {c.op:7} N={c.N:<3} T={c.T:<5} {c.H}/{c.HV:<3} {c.K}/{c.V:<3} "
                  f"{_SHORT[c.dtype]}/{_SHORT[c.state_dtype]} {c.layout} {pool} pad={len(c.padded_rows)} "
                  f"{c.name or ''}")
    say(f"{n} cases")


@command(cases_app, "show")
def cases_show(
    case_id: Annotated[str, typer.Argument(help="case id, id prefix, name, or case JSON")],
    results: Annotated[Optional[Path], typer.Option(help="also search this results file")] = None,
    digest: Annotated[bool, typer.Option("--digest", help="materialise the inputs and print their digest")] = False,
) -> None:
    """One case as JSON, with its derived sizes and repro line."""
    from gdncheck.inputs import inputs_digest, materialize
    from gdncheck.repro import find_case

    c = find_case(case_id, results)
    print(c.model_dump_json(indent=2))
    print(f"id {c.id}  N={c.N} B={c.B} T={c.T} HS={c.HS} padded rows={c.padded_rows or '-'}")
    if digest:
        print(f"inputs digest {inputs_digest(materialize(c))}")
    print(c.repro())


@command(app, "fuzz")
def fuzz_cmd(
    backend: Annotated[str, typer.Option("--backend", "-b", help="backend name, entry point or package.module:factory")],
    examples: Annotated[Optional[int], typer.Option("--examples", "-n", help="examples (default: the profile's)")] = None,
    profile: Annotated[Optional[str], typer.Option(help="dev, ci or nightly (default: $GDNCHECK_PROFILE, ci under $CI, else dev)")] = None,
    op: Annotated[Optional[list[str]], typer.Option("--op", help="ops to draw (repeatable; default all the backend runs)")] = None,
    max_tokens: Annotated[int, typer.Option(help="bound on tokens per case")] = 160,
    max_batch: Annotated[int, typer.Option(help="bound on sequences per case")] = 8,
    dims: Annotated[Optional[list[int]], typer.Option("--dim", help="K/V values to draw (repeatable)")] = None,
    budgets: Annotated[Optional[list[Path]], typer.Option("--budgets", help="TOML merged over the shipped budgets")] = None,
    device: Annotated[Optional[str], typer.Option(help="default: the backend's device")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Hypothesis seed")] = None,
) -> None:
    """Fuzz one backend with Hypothesis; a failure (judged like every other) is shrunk and printed as a repro line."""
    from gdncheck.backends import load_backend
    from gdncheck.budgets import load_budgets
    from gdncheck.fuzz import fuzz
    from gdncheck.strategies import DIMS, OPS, profile_name

    bud = load_budgets(budgets or [])
    b = load_backend(backend)
    why = b.available()
    if why:
        raise EnvironmentProblem(f"backend {backend} unavailable: {why}")
    try:
        profile_name(profile)
        kw = dict(ops=tuple(op or OPS), max_tokens=max_tokens, max_batch=max_batch, dims=tuple(dims or DIMS))
    except ValueError as e:
        raise UsageError(str(e)) from None
    rep = fuzz(b, max_examples=examples, profile=profile, device=device, seed=seed, budgets=bud, spec=backend, **kw)
    raise typer.Exit(0 if rep.ok else 1)


def _print_result(r, digest: str, budgets) -> list:
    from gdncheck.judge import checks, fmt, judge_result

    head = f"{r.backend} {r.status}" + (f": {r.reason}" if r.reason else "")
    head += (f"  path={r.path}" if r.path else "") + (f"  padding={r.policy}" if r.policy else "")
    print(head + f"  digest={digest}")
    if r.metrics:
        print(f"  {'tensor':12} {'count':>9} {'rel_l2':>10} {'floor':>10} {'x floor':>9} {'x twin':>8} {'ulp p99':>8}")
        for k, m in r.metrics.items():
            print(f"  {k:12} {m.count:>9} {fmt(m.rel_l2):>10} {fmt(m.floor_rel_l2):>10} {fmt(m.in_floors):>9} "
                  f"{fmt(m.in_twins):>8} {fmt(m.ulp_p99):>8}")
    for c in checks(r, budgets):
        print(f"  budget {c.metric}: {fmt(c.value)} <= {fmt(c.budget)} (headroom {fmt(c.headroom)})")
    found = judge_result(r, budgets)
    for f in found:
        print(f"  FAIL {f.check}: " + (f"{fmt(f.value)} > {fmt(f.limit)}; " if f.value is not None else "") + f.detail)
    return found


@command(app, "repro")
def repro_cmd(
    case: Annotated[Optional[str], typer.Argument(help="case id, id prefix, name, or case JSON")] = None,
    backend: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="backend(s) to run (repeatable; default: the CPU twins)")] = None,
    results: Annotated[Optional[Path], typer.Option(help="also search this results file for the case id")] = None,
    save: Annotated[Optional[Path], typer.Option(help="write a bundle (case.json, inputs.safetensors, README) here")] = None,
    load: Annotated[Optional[Path], typer.Option(help="reproduce from a bundle instead of the generator")] = None,
    device: Annotated[Optional[str], typer.Option(help="device of the inputs (default: cuda for CUDA backends, else cpu)")] = None,
    budgets: Annotated[Optional[list[Path]], typer.Option("--budgets", help="TOML merged over the shipped budgets")] = None,
    twin: Annotated[bool, typer.Option("--twin/--no-twin", help="judge against the backend's precision twin")] = True,
) -> None:
    """Rebuild one case's inputs, print their digest, run backends, print metrics beside budgets (exit 1 on a failure)."""
    from gdncheck.backends import load_backend
    from gdncheck.budgets import load_budgets
    from gdncheck.execute import run_inputs
    from gdncheck.inputs import inputs_digest, materialize
    from gdncheck.repro import find_case, load_bundle, save_bundle

    if (case is None) == (load is None):
        raise UsageError("give a CASE (id, name or JSON) or --load DIR, not both")
    bud = load_budgets(budgets or [])
    specs = backend or ["twin-fla", "twin-flashinfer"]
    backends = [load_backend(s) for s in specs]
    dev = device or ("cuda" if any(b.caps.device.startswith("cuda") for b in backends) else "cpu")
    inputs = load_bundle(load, dev) if load is not None else materialize(find_case(case, results), dev)
    c = inputs.case
    digest = inputs_digest(inputs)
    print(f"case {c.id} {c.name or ''}  op={c.op} N={c.N} T={c.T} H/HV={c.H}/{c.HV} K/V={c.K}/{c.V}")
    print(f"inputs digest {digest}")
    if save is not None:
        print(f"bundle: {save_bundle(inputs, save)}")
    failed = judged = 0
    for spec, b in zip(specs, backends):
        tw = load_backend(b.twin) if twin and b.twin and b.twin != b.name else None
        r, _ = run_inputs(b, inputs, twin=tw, spec=spec)
        found = _print_result(r, digest, bud)
        judged += r.status != "unsupported"
        failed += bool(found)
    if failed:
        raise typer.Exit(1)
    if not judged:
        raise EnvironmentProblem("no backend could run this case here: nothing was judged")
