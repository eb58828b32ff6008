"""Property-based fuzzing of one backend against the float64 oracle.

Hypothesis draws cases the backend declares it supports (:func:`gdncheck.strategies.cases`),
each is run and judged (:func:`judge`), and a failure is shrunk to a minimal case, printed as a
one-line ``gdncheck repro '<case JSON>' --backend NAME``.

Judgement (error model of :mod:`gdncheck.metrics`): a case fails on a crash/error, a NaN where the
oracle is finite, a broken hard contract (untouched pool rows changed, padded rows not as the
policy says, unwritten outputs), or an error outside its budget: ``in_twins <= twin_budget``
when the backend's precision twin ran (the kernel vs. what its own rounding predicts), else
``rel_l2 <= floor_budget`` floors, the floor being the largest of the tensor's storage rounding
floor, that of the input dtype (a kernel computing from bf16 inputs cannot keep an fp32 state
better than its bf16 inputs allow) and that of fp32 arithmetic (``0.4 u32 sqrt(K T)``: K-long
dot products over T recurrent steps): 1 is a perfectly rounded result, hundreds is a bug. A
tensor whose largest error is below the budget times the smallest normal of the case's input or
state dtype passes too (fp16 underflow: relative error means nothing there). The
floor rule only screens for gross errors (indices, padding, layouts, gates); the twin rule is
the precision check.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

from hypothesis import given, settings
from hypothesis import seed as hseed

from gdncheck.backends.base import Backend
import torch

from gdncheck.cases import DTYPES, Case
from gdncheck.report.schema import CaseResult
from gdncheck.strategies import cases, profile_name, register_profiles

TWIN_BUDGET = 8.0
FLOOR_BUDGET = 16.0
# unit roundoff; 0.4 u is the rel_l2 of rounding Gaussian data once (measured: bf16 0.00163)
_U = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}


def judge(r: CaseResult, *, twin_budget: float = TWIN_BUDGET, floor_budget: float = FLOOR_BUDGET) -> str | None:
    """None when ``r`` passes, else why it fails (one line)."""
    if r.status == "unsupported":
        return None
    if r.status != "ok":
        return f"{r.status}: {r.reason or ''}".strip()
    con = r.contracts
    if con is not None and not con.ok:
        what = [*con.padded_details, *con.details]
        if con.untouched_changed:
            what.insert(0, f"untouched pool rows changed: {con.untouched_changed[:8]}")
        if con.unwritten:
            what.append(f"{con.unwritten} elements left unwritten")
        if con.nan_where_finite:
            what.append(f"{con.nan_where_finite} NaN/Inf where the oracle is finite")
        return "contract: " + "; ".join(what or ["violated"])
    c = r.case
    steps = max([1, *c.seqlens]) if c.op == "prefill" else c.T
    # floor of the inputs' rounding, and of fp32 arithmetic: K-long dot products and a recurrence
    # of `steps` updates, each adding u-sized errors that add up as a random walk
    u_in = max(0.4 * _U[c.dtype], 0.4 * _U["float32"] * (c.K * steps) ** 0.5)
    # values below the smallest normal of a dtype in the pipeline (fp16: 6e-5) flush or lose
    # digits there: relative error means nothing for them (tiny gates times a zero state)
    tiny = max(torch.finfo(DTYPES[d]).tiny for d in (c.dtype, c.state_dtype))
    for name, m in r.metrics.items():
        if m.rel_l2 is None:
            continue
        if m.in_twins is not None and m.twin_rel_l2:
            if not m.in_twins <= twin_budget:
                return f"{name}: rel_l2 {m.rel_l2:.3g} = {m.in_twins:.3g} x twin (budget {twin_budget:g})"
            continue
        floor = max(m.floor_rel_l2 or 0.0, u_in)
        if not m.rel_l2 <= floor_budget * floor and not (m.max_abs or 0.0) <= floor_budget * tiny:
            return f"{name}: rel_l2 {m.rel_l2:.3g} = {m.rel_l2 / floor:.3g} x floor {floor:.2g} (budget {floor_budget:g})"
    return None


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
    twin_budget: float = TWIN_BUDGET,
    floor_budget: float = FLOOR_BUDGET,
    judge_fn: Callable[[CaseResult], str | None] | None = None,
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
        judge_fn: replaces :func:`judge`. out: where the repro line goes ("stdout" = the
            current sys.stdout, None = silent).
        strategy, strategy_kw: the case strategy, or keywords for :func:`~gdncheck.strategies.cases`.
    """
    from gdncheck.run import run_case

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
    judge_one = judge_fn or (lambda r: judge(r, twin_budget=twin_budget, floor_budget=floor_budget))
    strat = strategy if strategy is not None else cases(backend, **strategy_kw)
    rep = FuzzReport(backend=backend.name, profile=pname)
    last: list[tuple[Case, str]] = []

    def body(case: Case) -> None:
        rep.examples += 1
        r = run_case(backend, case, device=dev, twin=twin)
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
        rep.failure = FuzzFailure(case=case, reason=why, repro=f"{case.repro()} --backend {backend.name}")
        rep.reasons = sorted({w for _, w in last})
        if out is not None:
            print(f"FAIL {backend.name}: {why}", file=out)
            print(rep.failure.repro, file=out)
    elif out is not None:
        print(f"ok {backend.name}: {rep.examples} examples ({pname} profile)", file=out)
    return rep
