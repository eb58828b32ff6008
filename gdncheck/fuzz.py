"""Property-based fuzzing of one backend against the float64 oracle.

Hypothesis draws cases the backend declares it supports (:func:`gdncheck.strategies.cases`),
each is run (:func:`gdncheck.execute.run_case`) and judged by the one judge
(:func:`gdncheck.judge.judge_result`: status, hard contracts, budgets), and a failure is shrunk
to a minimal case, printed as a one-line ``gdncheck repro '<case JSON>' --backend SPEC``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

from hypothesis import given, settings
from hypothesis import seed as hseed

from gdncheck.backends.base import Backend
from gdncheck.budgets import Budgets, load_budgets
from gdncheck.data.case import Case
from gdncheck.data.results import CaseResult
from gdncheck.judge import judge_result
from gdncheck.strategies import cases, profile_name, register_profiles


def why_fails(r: CaseResult, budgets: Budgets) -> str | None:
    """The judge's findings of ``r`` in one line, or None when it passes (or is unsupported)."""
    found = judge_result(r, budgets)
    if not found:
        return None
    return "; ".join(f"{f.check}: {f.detail}" if f.limit is None else f"{f.check} = {f.value:.4g} > {f.limit:.4g}"
                     for f in found[:3])


@dataclass
class FuzzFailure:
    case: Case
    reason: str
    repro: str


@dataclass
class FuzzReport:
    backend: str
    profile: str
    examples: int = 0
    failure: FuzzFailure | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None


class _Failed(AssertionError):
    pass


def fuzz(
    backend: Backend,
    *,
    max_examples: int | None = None,
    profile: str | None = None,
    device: str | None = None,
    twin: Backend | None | bool = True,
    seed: int | None = None,
    budgets: Budgets | None = None,
    judge_fn: Callable[[CaseResult], str | None] | None = None,
    spec: str | None = None,
    out: TextIO | None | str = "stdout",
    strategy=None,
    **strategy_kw,
) -> FuzzReport:
    """Fuzz ``backend``; returns a :class:`FuzzReport` with the shrunk failure, if any.

    Args:
        max_examples: overrides the profile's count. profile: dev / ci / nightly (see strategies).
        device: where inputs are built (default ``backend.caps.device``).
        twin: the precision twin to judge against: True = the backend's declared ``twin``,
            a Backend, or None/False for floors only.
        seed: Hypothesis seed (ignored by derandomized profiles).
        budgets: the budgets to judge by (default: the shipped ones).
        judge_fn: replaces :func:`why_fails` (tests). spec: the backend spec for repro lines. out: where the repro line goes ("stdout" = the
            current sys.stdout, None = silent).
        strategy, strategy_kw: the case strategy, or keywords for :func:`~gdncheck.strategies.cases`.
    """
    from gdncheck.execute import run_case

    if out == "stdout":
        out = sys.stdout
    register_profiles()
    pname = profile_name(profile)
    dev = device or ("cpu" if backend.caps.device == "any" else backend.caps.device)
    if twin is True:
        twin = None
        if backend.twin and backend.twin != backend.name:
            from gdncheck.backends import load_backend
            twin = load_backend(backend.twin)
    twin = twin or None
    budgets = budgets or load_budgets()
    judge_one = judge_fn or (lambda r: why_fails(r, budgets))
    strat = strategy if strategy is not None else cases(backend, **strategy_kw)
    rep = FuzzReport(backend=backend.name, profile=pname)
    last: list[tuple[Case, str]] = []

    def body(case: Case) -> None:
        rep.examples += 1
        r = run_case(backend, case, device=dev, twin=twin, spec=spec)
        why = judge_one(r)
        if why is not None:
            last.append((case, why))
            raise _Failed(why)

    s = settings(settings.get_profile(pname), report_multiple_bugs=False,
                 **({"max_examples": max_examples} if max_examples is not None else {}))
    test = settings(s)(given(strat)(body))
    if seed is not None:
        test = hseed(seed)(test)
    try:
        test()
    except _Failed:
        pass
    if last:
        # Hypothesis replays the shrunk example last.
        case, why = last[-1]
        rep.failure = FuzzFailure(case=case, reason=why, repro=case.repro(spec or backend.name))
        rep.reasons = sorted({w for _, w in last})
        if out is not None:
            print(f"FAIL {backend.name}: {why}", file=out)
            print(rep.failure.repro, file=out)
    elif out is not None:
        print(f"ok {backend.name}: {rep.examples} examples ({pname} profile)", file=out)
    return rep
