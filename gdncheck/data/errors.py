"""Exit codes and the errors that carry them: one table for every command.

| code | meaning |
|--:|---|
| 0 | pass: every planned pair judged, none failed |
| 1 | a precision or contract failure, a regression, or planned pairs missing from the evidence |
| 2 | usage or configuration: bad option, suite, budgets, baseline, backend spec or output directory |
| 3 | environment: nothing to judge, a backend, package or GPU missing, a tool not installed |
| 4 | internal error of gdncheck itself (a bug; ``GDNCHECK_DEBUG=1`` shows the traceback) |
| 130 | interrupted (Ctrl-C); results recorded so far are kept and the command to resume is printed |
"""
from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    PASS = 0
    FAIL = 1
    USAGE = 2
    ENVIRONMENT = 3
    INTERNAL = 4
    INTERRUPTED = 130


class GdncheckError(Exception):
    """An error the user can act on: printed as one line, never a traceback; ``code`` is the exit code."""

    code: Exit = Exit.USAGE


class UsageError(GdncheckError):
    """Bad input: an option, a suite or case file, budgets, a baseline, a backend spec, an output directory."""

    code = Exit.USAGE


class EnvironmentProblem(GdncheckError):
    """What was asked cannot run here, or there is nothing to judge: a package, GPU or tool is missing."""

    code = Exit.ENVIRONMENT
