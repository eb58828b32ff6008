"""The ``gdncheck`` command line: parses arguments and calls the layers below; decides nothing.

Exit codes (one table for every command, :class:`gdncheck.data.errors.Exit`): 0 pass, 1 precision
or contract failure (or planned pairs missing), 2 usage or configuration, 3 environment (nothing to
judge, a backend, package or GPU missing), 4 internal error of gdncheck, 130 interrupted. A user
error is one line on stderr, never a traceback, and is found before work starts.
"""
from __future__ import annotations

import functools
import os
import sys

import typer

from gdncheck import __version__
from gdncheck.data.errors import Exit, GdncheckError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Numerical verification and fuzzing for Gated Delta Rule kernels.")


def say(msg: str = "", err: bool = True) -> None:
    """Print one line (no markup: CI logs show it as written)."""
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def guarded(fn):
    """Wrap a command: a :class:`GdncheckError` becomes one line and its exit code, Ctrl-C exit
    130, anything else an internal error (exit 4; ``GDNCHECK_DEBUG=1`` re-raises for the traceback)."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except typer.Exit:
            raise
        except GdncheckError as e:
            say(("interrupted: " if e.code == Exit.INTERRUPTED and not str(e).startswith("interrupted") else
                 "" if e.code == Exit.INTERRUPTED else "error: ") + str(e))
            raise typer.Exit(int(e.code)) from None
        except KeyboardInterrupt:
            say("interrupted")
            raise typer.Exit(int(Exit.INTERRUPTED)) from None
        except Exception as e:  # noqa: BLE001 - a bug in gdncheck must not read as a kernel failure (exit 1)
            if os.environ.get("GDNCHECK_DEBUG"):
                raise
            say(f"internal error: {type(e).__name__}: {e} (a bug in gdncheck; GDNCHECK_DEBUG=1 shows the traceback)")
            raise typer.Exit(int(Exit.INTERNAL)) from None
    return wrapper


def command(group: typer.Typer, name: str, **kw):
    """``@command(app, "run")``: register a guarded command."""
    def deco(fn):
        group.command(name, **kw)(guarded(fn))
        return fn
    return deco


def _version(value: bool) -> None:
    if value:
        print(f"gdncheck {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Numerical verification and fuzzing for Gated Delta Rule kernels."""


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # between commands' own handling (e.g. during imports)
        say("interrupted")
        sys.exit(int(Exit.INTERRUPTED))


# the commands register themselves on import, in help order
from gdncheck.cli import run as _run, gate as _gate, report as _report, cases as _cases  # noqa: E402,F401
from gdncheck.cli import explain as _explain, parity as _parity, ablate as _ablate, drift as _drift  # noqa: E402,F401
from gdncheck.cli import bench as _bench  # noqa: E402,F401
