"""The data of a report: per backend x op x dtype counts and floors, time, failures, worst cases.

Outcomes come from the judge (:mod:`gdncheck.judge`); nothing here decides pass or fail.
"""
from __future__ import annotations

import math
from collections import defaultdict

from gdncheck.budgets import Budgets
from gdncheck.data.results import SCHEMA_VERSION, CaseResult, RunHeader
from gdncheck.data.verdict import Verdict
from gdncheck.judge import checks, fmt, judge_result, outcome

STATUSES = ("ok", "unsupported", "error", "nan", "crash")
TENSORS = ("o", "state", "intermediate")


def score(r: CaseResult) -> float:
    """Worst ``in_floors`` over the result's tensors (0 when none)."""
    vals = [m.in_floors for m in r.metrics.values() if m.in_floors is not None and not math.isnan(m.in_floors)]
    return max(vals, default=0.0)


def group_key(r: CaseResult) -> tuple[str, str, str]:
    return (r.backend, r.case.op, r.case.dtype)


def stats(vals: list[float]) -> dict | None:
    vals = sorted(v for v in vals if v is not None and not math.isnan(v))
    if not vals:
        return None
    n = len(vals)

    def q(p):  # nearest rank
        return vals[min(n - 1, max(0, math.ceil(p * n) - 1))]
    return {"n": n, "median": q(0.5), "p99": q(0.99), "max": vals[-1]}


def case_line(r: CaseResult, budgets: Budgets) -> dict:
    """One result for a report: its outcome, what failed, each budgeted metric beside its budget."""
    found = judge_result(r, budgets)
    return {
        "case_id": r.case_id, "name": r.case.name, "backend": r.backend, "op": r.case.op,
        "dtype": r.case.dtype, "state_dtype": r.case.state_dtype, "status": r.status,
        "outcome": outcome(r, budgets), "path": r.path,
        "failure": "; ".join(f"{f.check}: {f.detail}" if f.limit is None else
                             f"{f.check} = {fmt(f.value)} > {fmt(f.limit)} ({f.detail})" for f in found) or None,
        "checks": [{"metric": c.metric, "value": c.value, "budget": c.budget, "headroom": c.headroom, "why": c.why}
                   for c in checks(r, budgets)],
        "in_floors": {k: m.in_floors for k, m in r.metrics.items()},
        "score": score(r), "repro": r.repro or r.case.repro(r.backend),
    }


def summarize(header: RunHeader, results: list[CaseResult], verdict: Verdict, budgets: Budgets, *,
              worst: int = 5) -> dict:
    """Summary of a run: the verdict and its evidence, per (backend, op, dtype) counts and
    ``in_floors`` statistics (median / p99 / max of o, state, intermediate), time by backend,
    failures with what broke and their repro lines, worst cases beside their budgets."""
    outs = {id(r): outcome(r, budgets) for r in results}
    groups: dict[tuple, list[CaseResult]] = defaultdict(list)
    for r in results:
        groups[group_key(r)].append(r)
    out_groups = []
    for (backend, op, dtype), rs in sorted(groups.items()):
        counts = {s: sum(r.status == s for r in rs) for s in STATUSES}
        counts.update({"pass": sum(outs[id(r)] == "pass" for r in rs), "fail": sum(outs[id(r)] == "fail" for r in rs)})
        g = {"backend": backend, "op": op, "dtype": dtype, "cases": len(rs), "counts": counts}
        for t in TENSORS:
            g[t] = stats([r.metrics[t].in_floors for r in rs if t in r.metrics])
        out_groups.append(g)
    timing = []
    by_backend: dict[str, list[CaseResult]] = defaultdict(list)
    for r in results:
        by_backend[r.backend].append(r)
    for backend, rs in sorted(by_backend.items()):
        ran = [r for r in rs if r.timing.run_s is not None]
        timing.append({
            "backend": backend, "cases_run": len(ran),
            "compile_keys": sum(r.timing.compile_s is not None for r in rs),
            "compile_s": sum(r.timing.compile_s or 0.0 for r in rs),
            "run_s": sum(r.timing.run_s or 0.0 for r in rs),
            "oracle_s": sum(r.timing.oracle_s or 0.0 for r in rs),
            "wall_s": sum(r.timing.wall_s or 0.0 for r in rs),
        })
    ev = verdict.evidence
    ranked = sorted((r for r in results if r.status != "unsupported"),
                    key=lambda r: (outs[id(r)] == "fail", score(r)), reverse=True)
    return {
        "schema_version": SCHEMA_VERSION, "kind": "summary", "run_id": header.run_id,
        "suites": header.suites, "backends": header.backends, "jobs": header.jobs,
        "environment": header.environment.model_dump(exclude_none=True),
        "verdict": verdict.model_dump(mode="json", exclude={"failures", "regressions", "improvements"}),
        "verdict_word": verdict.word, "exit_code": verdict.exit_code,
        "totals": {"planned": ev.planned, "results": ev.results, "judged": ev.judged, "passed": ev.passed,
                   "fail": ev.failed, "unsupported": ev.unsupported, "missing": len(ev.missing),
                   **{s: sum(r.status == s for r in results) for s in STATUSES}},
        "groups": out_groups, "timing": timing,
        "failures": [case_line(r, budgets) for r in ranked if outs[id(r)] == "fail"],
        "worst": [case_line(r, budgets) for r in ranked[:10]],
        "budgets": budgets.files,
    }
