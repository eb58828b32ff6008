"""The ``gdncheck`` command line. Each stage module adds its commands through ``register(app)``.

Exit codes: 0 pass, 1 precision or contract failure, 2 usage or configuration error,
3 environment (no GPU, or a required backend missing).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Numerical verification and fuzzing for Gated Delta Rule kernels.")
err = Console(stderr=True)

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_ENV = 0, 1, 2, 3

# Modules that contribute commands, in help order.
_COMMAND_MODULES = ("cases_cli", "bench", "report.cli", "drift", "gate", "ablate")


def usage_error(msg: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {msg}")
    return typer.Exit(EXIT_USAGE)


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    if shard is None:
        return None
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise usage_error(f"--shard: expected i/n (e.g. 0/4), got {shard!r}") from None
    if not 0 <= i < n:
        raise usage_error(f"--shard: need 0 <= i < n, got {shard!r}")
    return i, n


def resolve_backends(specs: list[str] | None, device: str) -> list[str]:
    """Backend specs to run: the given ones (validated) or the defaults for ``device``."""
    from gdncheck.backends import BackendNotFound, default_backends, load_backend

    specs = specs or default_backends(device.startswith("cuda"))
    for s in specs:
        try:
            load_backend(s)
        except BackendNotFound as e:
            raise usage_error(str(e)) from None
    return specs


@app.command("run")
def run_cmd(
    suite: Annotated[Optional[list[str]], typer.Option("--suite", "-s", help="suite name or TOML path (repeatable)")] = None,
    backend: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="name, entry point or package.module:factory (repeatable)")] = None,
    out: Annotated[Path, typer.Option(help="run directory: results.jsonl and the rendered report")] = Path("runs/latest"),
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default cuda when present")] = None,
    isolate: Annotated[Optional[bool], typer.Option("--isolate/--no-isolate", help="one worker process per backend (default on CUDA)")] = None,
    resume: Annotated[bool, typer.Option("--resume/--fresh", help="skip pairs already in results.jsonl")] = True,
    shard: Annotated[Optional[str], typer.Option(help="run shard i/n of the pairs")] = None,
    render: Annotated[bool, typer.Option("--render/--no-render", help="render the report when done")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="worker processes side by side on the device (kernels compile in parallel)")] = 1,
    sanitize: Annotated[Optional[str], typer.Option("--sanitize", help="run each case in its own process under compute-sanitizer --tool memcheck|initcheck|racecheck|synccheck")] = None,
) -> None:
    """Run suites x backends against the float64 oracle (CPU default: twins + FLA interpreter on `smoke`)."""
    from gdncheck.cases import SuiteError
    from gdncheck.run import default_device, run

    device = device or default_device()
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            err.print("[red]error:[/red] --device cuda but no CUDA device is visible")
            raise typer.Exit(EXIT_ENV)
    suites = suite or ["smoke"]
    specs = resolve_backends(backend, device)
    results = out / "results.jsonl"
    try:
        if sanitize:
            from gdncheck import sanitize as S
            try:
                S.require(sanitize)
            except S.SanitizerMissing as e:
                err.print(f"environment: {e}", highlight=False, markup=False)
                raise typer.Exit(EXIT_ENV) from None
            S.run_suites(suites, specs, results, sanitize, device=device, jobs=jobs, resume=resume,
                         shard=parse_shard(shard), progress=progress)
        else:
            run(suites, specs, results, device=device, isolate=isolate, resume=resume,
                shard=parse_shard(shard), progress=progress, jobs=jobs)
    except ValueError as e:
        raise usage_error(str(e)) from None
    except SuiteError as e:
        raise usage_error(str(e)) from None
    err.print(f"results: {results}")
    if render:
        from gdncheck.report import render as render_report
        render_report.render_cli(results, out)


def _register_all() -> None:
    for mod in _COMMAND_MODULES:
        try:
            m = importlib.import_module(f"gdncheck.{mod}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("gdncheck"):
                continue  # a stage not built into this install
            raise
        m.register(app)


_register_all()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; results so far are kept (rerun with --resume)")
        sys.exit(130)
