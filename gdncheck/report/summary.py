"""Verdict per result, grouping per backend x op x dtype, and the summary JSON."""
from __future__ import annotations

import math
from collections import defaultdict

from gdncheck.report.schema import SCHEMA_VERSION, CaseResult, RunHeader

STATUSES = ("ok", "unsupported", "error", "nan", "crash")
TENSORS = ("o", "state", "intermediate")


def failure(r: CaseResult) -> str | None:
    """Why ``r`` fails, or None. Fails: status error/nan/crash, any broken contract, or a
    ``fail`` verdict the runner recorded in ``extra['verdict']`` (budget exceeded)."""
    if r.status in ("error", "nan", "crash"):
        return f"{r.status}: {r.reason or ''}".strip().rstrip(":")
    c = r.contracts
    if c is not None and not c.ok:
        why = []
        if c.untouched_changed:
            why.append(f"untouched rows changed {c.untouched_changed[:8]}")
        if c.padded_ok is False:
            why.append("padding: " + "; ".join(c.padded_details[:3]))
        if c.unwritten:
            why.append(f"{c.unwritten} elements unwritten")
        if c.nan_where_finite:
            why.append(f"{c.nan_where_finite} NaN/Inf where the oracle is finite")
        if c.state_written is False:
            why.append("state not written" + (f" ({c.details[0]})" if c.details else ""))
        return "contract: " + ", ".join(why)
    if r.extra.get("verdict") == "fail":
        return str(r.extra.get("verdict_reason") or "over budget")
    return None


def outcome(r: CaseResult) -> str:
    """``pass`` / ``fail`` / ``skip`` (unsupported)."""
    if r.status == "unsupported":
        return "skip"
    return "fail" if failure(r) else "pass"


def score(r: CaseResult) -> float:
    """Worst ``in_floors`` over the result's tensors (0 when none); failures rank above all."""
    vals = [m.in_floors for m in r.metrics.values() if m.in_floors is not None and not math.isnan(m.in_floors)]
    return max(vals, default=0.0)


def group_key(r: CaseResult) -> tuple[str, str, str]:
    return (r.backend, r.case.op, r.case.dtype)


def _stats(vals: list[float]) -> dict | None:
    vals = sorted(v for v in vals if v is not None and not math.isnan(v))
    if not vals:
        return None
    n = len(vals)

    def q(p):  # nearest rank
        return vals[min(n - 1, max(0, math.ceil(p * n) - 1))]
    return {"n": n, "median": q(0.5), "p99": q(0.99), "max": vals[-1]}


def case_line(r: CaseResult) -> dict:
    return {
        "case_id": r.case_id, "name": r.case.name, "backend": r.backend, "op": r.case.op,
        "dtype": r.case.dtype, "state_dtype": r.case.state_dtype, "status": r.status,
        "failure": failure(r), "path": r.path,
        "in_floors": {k: m.in_floors for k, m in r.metrics.items()},
        "score": score(r), "repro": r.repro or r.case.repro(),
    }


def _worst(rs: list[CaseResult], n: int) -> list[dict]:
    ranked = sorted((r for r in rs if r.status != "unsupported"),
                    key=lambda r: (failure(r) is not None, score(r)), reverse=True)
    return [case_line(r) for r in ranked[:n]]


def summarize(header: RunHeader, results: list[CaseResult], *, worst: int = 5) -> dict:
    """Summary of a run: totals, per (backend, op, dtype) counts and in_floors statistics
    (median / p99 / max of o, state, intermediate), per-backend time (kernel compiles apart from
    kernel runs and the oracle), failures and worst cases with repro lines."""
    groups: dict[tuple, list[CaseResult]] = defaultdict(list)
    for r in results:
        groups[group_key(r)].append(r)
    out_groups = []
    for (backend, op, dtype), rs in sorted(groups.items()):
        counts = {s: sum(r.status == s for r in rs) for s in STATUSES}
        counts["fail"] = sum(outcome(r) == "fail" for r in rs)
        counts["pass"] = sum(outcome(r) == "pass" for r in rs)
        g = {"backend": backend, "op": op, "dtype": dtype, "cases": len(rs), "counts": counts}
        for t in TENSORS:
            g[t] = _stats([r.metrics[t].in_floors for r in rs if t in r.metrics])
        g["worst"] = _worst(rs, worst)
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
    totals = {s: sum(r.status == s for r in results) for s in STATUSES}
    totals.update(cases=len(results), fail=sum(outcome(r) == "fail" for r in results),
                  passed=sum(outcome(r) == "pass" for r in results))
    return {
        "schema_version": SCHEMA_VERSION, "kind": "summary", "run_id": header.run_id,
        "suites": header.suites, "backends": header.backends, "jobs": header.jobs,
        "environment": header.environment.model_dump(exclude_none=True),
        "totals": totals, "groups": out_groups, "timing": timing,
        "failures": [case_line(r) for r in results if outcome(r) == "fail"],
        "worst": _worst(results, 10),
    }
