"""The one judge: a result's verdict, a run's verdict, and a run against a baseline.

Every command that says pass or fail (``run``, ``gate``, ``fuzz``, ``repro``, ``report
render|compare|matrix|merge``, ``ablate``, the kill table) calls these functions; none decides
on its own.

A result **fails** on any of:

- status ``error``, ``nan`` or ``crash`` (``unsupported`` is never judged: it neither passes nor fails);
- a hard contract (:class:`~gdncheck.data.results.Contracts`): untouched pool rows changed, padded
  rows against the declared policy, unwritten elements, NaN/Inf where the oracle is finite, final
  state not written where the API says, guard elements around a buffer changed;
- a budget: ``metrics[tensor].field > max`` for the most specific matching budget entry.

A **run** fails when a result fails, when a planned pair has no result (a cut run, a missing
shard), or, against a baseline, when a pair passed there and fails now or a budgeted metric grew
by more than ``factor`` (:data:`REGRESS_FACTOR`) while standing above its noise level
(:data:`NOISE`). A run with nothing judged is exit 3, never a pass; a baseline that shares less
than ``min_overlap`` of the run's judged pairs is refused (exit 2).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

from gdncheck.budgets import Budgets
from gdncheck.data.errors import Exit
from gdncheck.data.io import latest, result_key
from gdncheck.data.results import CaseResult, TensorMetrics
from gdncheck.data.verdict import BaselineEvidence, Evidence, Finding, KnownFinding, MetricCheck, Verdict

REGRESS_FACTOR = 1.5
# Below these values a metric sits at the rounding floor: a baseline "regression" there is noise.
NOISE = {"in_floors": 1.0, "in_twins": 1.0}
MIN_OVERLAP = 0.5


def fmt(x: float | None) -> str:
    """A metric value in 4 significant digits ('-' for None)."""
    if x is None:
        return "-"
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.4g}"


def _finding(r: CaseResult, kind: str, check: str, **kw) -> Finding:
    return Finding(kind=kind, check=check, backend=r.backend, case_id=r.case_id, case=r.case.name or r.case_id,
                   op=r.case.op, dtype=r.case.dtype, repro=r.repro or r.case.repro(r.backend), **kw)


def _metric(r: CaseResult, tensor: str, fld: str) -> float | None:
    m: TensorMetrics | None = r.metrics.get(tensor)
    return None if m is None else getattr(m, fld)


def checks(r: CaseResult, budgets: Budgets, *, as_backend: str | None = None) -> list[MetricCheck]:
    """Every budgeted metric of ``r`` beside its budget (metrics the result lacks are left out)."""
    out = []
    for metric, b in sorted(budgets.for_result(r, as_backend).items()):
        v = _metric(r, b.tensor, b.field)
        if v is None and b.tensor not in r.metrics:
            continue
        out.append(MetricCheck(metric=metric, value=v, budget=b.max, source=b.source, why=b.why))
    return out


def _sanitizer(r: CaseResult) -> list[Finding]:
    """A run under compute-sanitizer (``--sanitize``) fails on any error the tool counted."""
    s = r.sanitizer
    if s is None or not s.errors:
        return []
    first = next((f for f in s.findings if f.severity == "error"), None)
    return [_finding(r, "sanitizer", f"sanitizer:{s.tool}", value=s.errors,
                     detail=(f"{s.errors} errors; first: {first.summary()}" if first else s.summary)[:300])]


def judge_result(r: CaseResult, budgets: Budgets, *, as_backend: str | None = None) -> list[Finding]:
    """Why ``r`` fails (empty: it passes, or it is unsupported and not judged).

    ``as_backend``: look budgets up under this name (a planted fault judged as the kernel it fakes).
    """
    if r.status == "unsupported":
        return []
    san = _sanitizer(r)
    if r.status != "ok":
        why = r.reason or ""
        if not why and r.contracts is not None and r.contracts.nan_where_finite:
            why = f"{r.contracts.nan_where_finite} NaN/Inf where the oracle is finite"
        return san + [_finding(r, "status", f"status:{r.status}", detail=why[:300])]
    c = r.contracts
    if c is None:
        return san + [_finding(r, "contract", "contract:missing", detail="result carries no contracts")]
    out: list[Finding] = san
    extra = "; ".join(c.details[:3])
    if c.untouched_changed:
        out.append(_finding(r, "contract", "contract:untouched_rows", value=len(c.untouched_changed),
                            detail=f"pool rows {c.untouched_changed[:8]} changed; the call must not touch them "
                                   f"({c.untouched_rows} such rows)"))
    if c.padded_ok is False:
        out.append(_finding(r, "contract", "contract:padding", detail="; ".join(c.padded_details[:3])))
    if c.unwritten:
        out.append(_finding(r, "contract", "contract:unwritten", value=c.unwritten,
                            detail=f"{c.unwritten} elements the call had to write still hold the NaN poison"))
    if c.nan_where_finite:
        out.append(_finding(r, "contract", "contract:nan_inf", value=c.nan_where_finite,
                            detail=f"{c.nan_where_finite} NaN/Inf where the oracle is finite"))
    if c.state_written is False:
        out.append(_finding(r, "contract", "contract:state_written", detail=extra or "state not written"))
    if c.redzone:
        out.append(_finding(r, "contract", "contract:redzone", value=len(c.redzone), detail="; ".join(c.redzone[:3])))
    if c.inputs_modified:
        out.append(_finding(r, "contract", "contract:inputs_modified", value=len(c.inputs_modified),
                            detail="; ".join(c.inputs_modified[:3])))
    for chk in checks(r, budgets, as_backend=as_backend):
        v = chk.value
        if v is None or math.isinf(chk.budget):
            continue
        if math.isnan(v) or v > chk.budget:
            sev = math.inf if math.isnan(v) or chk.budget == 0 else v / chk.budget
            out.append(_finding(r, "budget", chk.metric, value=v, limit=chk.budget, severity=sev,
                                detail=f"budget {chk.source}" + (f": {chk.why}" if chk.why else "")))
    return out


def outcome(r: CaseResult, budgets: Budgets) -> str:
    """``pass``, ``fail`` or ``unsupported`` (not judged)."""
    if r.status == "unsupported":
        return "unsupported"
    return "fail" if judge_result(r, budgets) else "pass"


def compare(cur: list[CaseResult], base: list[CaseResult], budgets: Budgets, *, factor: float = REGRESS_FACTOR
            ) -> tuple[list[Finding], list[Finding], BaselineEvidence]:
    """``(regressions, improvements, evidence)`` of ``cur`` against a baseline, per (case, backend).

    Regression: passed in the baseline and fails now, or a budgeted metric grew by more than
    ``factor`` and stands above its noise level (1 floor / 1 twin for ``in_*`` metrics).
    """
    idx = {result_key(b): b for b in latest(base)}
    cur = latest(cur)
    regs: list[Finding] = []
    imps: list[Finding] = []
    ev = BaselineEvidence(factor=factor)
    judged_run = [r for r in cur if r.status != "unsupported"]
    judged_base = {k for k, b in idx.items() if b.status != "unsupported"}
    for r in judged_run:
        b = idx.get(result_key(r))
        if b is None or b.status == "unsupported":
            ev.only_in_run += 1
            continue
        ev.compared += 1
        if r.status == b.status and r.metrics == b.metrics:
            ev.identical += 1
        was_ok, is_ok = not judge_result(b, budgets), not judge_result(r, budgets)
        if was_ok and not is_ok:
            regs.append(_finding(r, "now-fails", "passed in baseline", detail=f"baseline status {b.status}"))
        elif is_ok and not was_ok:
            imps.append(_finding(r, "now-passes", "failed in baseline", severity=0.0))
        if r.status != "ok" or b.status != "ok":
            continue
        for metric, bud in budgets.for_result(r).items():
            v, w = _metric(r, bud.tensor, bud.field), _metric(b, bud.tensor, bud.field)
            if v is None or w is None or math.isnan(v) or math.isnan(w):
                continue
            noise = NOISE.get(bud.field, 0.0)
            if v > factor * w and v > noise:
                regs.append(_finding(r, "regression", metric, value=v, limit=w * factor,
                                     severity=v / w if w > 0 else math.inf,
                                     detail=f"{fmt(w)} -> {fmt(v)} (x{fmt(v / w) if w > 0 else 'inf'})"))
            elif v * factor < w and w > noise:
                imps.append(_finding(r, "improved", metric, value=v, limit=w, severity=w / max(v, 1e-300),
                                     detail=f"{fmt(w)} -> {fmt(v)}"))
    ev.only_in_baseline = len(judged_base - {result_key(r) for r in judged_run})
    ev.overlap = ev.compared / len(judged_run) if judged_run else 0.0
    regs.sort(key=lambda f: -f.severity)
    imps.sort(key=lambda f: -f.severity)
    return regs, imps, ev


def findings_of(r: CaseResult) -> list[str]:
    """The documented findings (tags ``finding:N``) result ``r`` speaks for: those of its case when
    the case names ``r``'s backend (``on:<backend>``) or names none. A finding's case failing on
    another backend fails the run, but for a reason of that backend's own."""
    fs = [t.removeprefix("finding:") for t in r.case.tags if t.startswith("finding:")]
    on = [t.removeprefix("on:") for t in r.case.tags if t.startswith("on:")]
    return fs if not on or r.backend in on else []


def known_findings(results: list[CaseResult], budgets: Budgets) -> list[KnownFinding]:
    """State of each documented finding (:func:`findings_of`) in this run, per backend:
    ``still failing`` when any of its cases fails on that backend, ``fixed`` when they ran and pass."""
    per: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    cases: dict[str, set[str]] = defaultdict(set)
    for r in results:
        for f in findings_of(r):
            cases[f].add(r.case.name or r.case_id)
            per[f][r.backend].append(outcome(r, budgets))
    out = []
    for f in sorted(per, key=lambda x: (len(x), x)):
        states = {}
        for b, outs in sorted(per[f].items()):
            ran = [o for o in outs if o != "unsupported"]
            states[b] = "not run" if not ran else ("still failing" if "fail" in ran else "fixed")
        vals = set(states.values())
        state = "still failing" if "still failing" in vals else ("fixed" if "fixed" in vals else "not run")
        out.append(KnownFinding(finding=f, state=state, backends=states, cases=sorted(cases[f])))
    return out


def judge_run(results: list[CaseResult], budgets: Budgets, *, planned: Iterable[tuple[str, str]] | None = None,
              shards: list[str] | None = None, require: Iterable[str] = (), baseline: list[CaseResult] | None = None,
              baseline_path: str | None = None, baseline_env: dict | None = None, factor: float = REGRESS_FACTOR,
              min_overlap: float = MIN_OVERLAP, allow_empty: bool = False) -> Verdict:
    """The verdict over one run's results (a later line for the same pair wins).

    Args:
        planned: the (case id, backend) pairs the run set out to judge (its header's plan); results
            outside it are ignored, planned pairs without a result fail the run. None: the file does
            not say (version 1), and the verdict says so.
        require: backends that must have run at least one case (else exit 3).
        baseline: results of an earlier run to compare with; refused (exit 2) when it shares less
            than ``min_overlap`` of this run's judged pairs.
        allow_empty: a verdict over zero judged pairs is exit 3 unless this is set.
    """
    results = latest(results)
    ev = Evidence(results=len(results), shards=list(shards or []))
    messages: list[str] = []
    if planned is not None:
        plan = {tuple(p) for p in planned}
        ev.planned = len(plan)
        have = {result_key(r) for r in results}
        ev.missing = sorted(plan - have)
        ev.unplanned = len(have - plan)
        results = [r for r in results if result_key(r) in plan]
    failures: list[Finding] = []
    reasons: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in results:
        if r.status == "unsupported":
            ev.unsupported += 1
            reasons[r.backend][r.reason or "unsupported"] += 1
            continue
        f = judge_result(r, budgets)
        ev.judged += 1
        if f:
            ev.failed += 1
            failures += f
        else:
            ev.passed += 1
    ev.unsupported_reasons = {b: dict(sorted(rs.items(), key=lambda kv: -kv[1])) for b, rs in sorted(reasons.items())}
    for cid, b in ev.missing:
        failures.append(Finding(kind="missing", check="missing", backend=b, case_id=cid, case=cid,
                                detail="planned but no result: the run was cut or a shard is missing"))
    failures.sort(key=lambda f: (-f.severity, f.backend, f.case, f.check))
    code = Exit.FAIL if failures else Exit.PASS
    if ev.missing:
        messages.append(f"{len(ev.missing)} of {ev.planned} planned pairs have no result (the run was cut or a shard "
                        "is missing): the evidence is incomplete")
    if planned is None:
        messages.append("the results file does not record its plan (schema version 1): missing pairs cannot be counted")
    for name in require:
        ran = [r for r in results if r.backend == name and r.status != "unsupported"]
        if not ran:
            why = sorted(reasons.get(name, {}))
            messages.append(f"required backend {name!r} ran no case" + (f": {why[0]}" if why else ""))
            code = Exit.ENVIRONMENT
    regs: list[Finding] = []
    imps: list[Finding] = []
    bev = None
    if baseline is not None:
        regs, imps, bev = compare(results, baseline, budgets, factor=factor)
        bev.path, bev.environment, bev.min_overlap = baseline_path, baseline_env or {}, min_overlap
        if ev.judged and bev.overlap < min_overlap:
            messages.append(f"baseline refused: it shares {bev.compared} of {ev.judged} judged pairs "
                            f"({bev.overlap:.0%}, below {min_overlap:.0%}); is it a run of the same suites and backends?")
            code = Exit.USAGE
        elif regs and code == Exit.PASS:
            code = Exit.FAIL
    if ev.judged == 0 and not allow_empty and code != Exit.USAGE:
        messages.append(f"nothing was judged ({ev.results} results, {ev.unsupported} unsupported): no evidence is not a "
                        "pass")
        code = Exit.ENVIRONMENT
    return Verdict(exit_code=int(code), failures=failures, regressions=regs, improvements=imps, evidence=ev,
                   baseline=bev, known=known_findings(results, budgets), messages=messages)
