"""Compare two runs: per-metric deltas, new and fixed failures, regressions beyond a factor.

A pair (case, backend) present in both runs *regresses* on a tensor when
``max(B, min_floors) / max(A, min_floors) > factor`` for its ``in_floors``; ``min_floors``
(default 1: the rounding floor) keeps noise among near-perfect results from counting.
"""
from __future__ import annotations

import math
from collections import defaultdict

from gdncheck.report.io import result_key
from gdncheck.report.schema import CaseResult
from gdncheck.report.summary import TENSORS, _stats, case_line, group_key, outcome


def _ratio(a: float, b: float, lo: float) -> float:
    a, b = max(a, lo), max(b, lo)
    if math.isinf(b):
        return 1.0 if math.isinf(a) else math.inf
    return b / a


def compare(a: list[CaseResult], b: list[CaseResult], *, factor: float = 2.0, min_floors: float = 1.0) -> dict:
    """Compare run ``a`` (baseline) to run ``b``.

    Returns a dict: ``regressions`` (pair, tensor, A, B, ratio), ``new_failures``,
    ``fixed_failures``, ``status_changes``, ``only_a`` / ``only_b`` counts, ``identical`` (pairs
    with the same status and bit-identical metrics), ``max_spread`` (largest ``in_floors`` ratio
    either way over common pairs and tensors, 1 when all equal), ``groups``
    (median in_floors of A and B per backend x op x dtype and tensor), ``regressed`` (bool).
    """
    A = {result_key(r): r for r in a}
    B = {result_key(r): r for r in b}
    regressions, new_f, fixed_f, changes = [], [], [], []
    identical, spread = 0, 1.0
    for key, rb in B.items():
        ra = A.get(key)
        ob = outcome(rb)
        if ra is None:
            if ob == "fail":
                new_f.append(case_line(rb))
            continue
        oa = outcome(ra)
        if ob == "fail" and oa != "fail":
            new_f.append(case_line(rb))
        elif oa == "fail" and ob == "pass":
            fixed_f.append(case_line(rb))
        if ra.status != rb.status:
            changes.append({"case_id": key[0], "backend": key[1], "a": ra.status, "b": rb.status})
        elif ra.metrics == rb.metrics:
            identical += 1
        for t in TENSORS:
            ma, mb = ra.metrics.get(t), rb.metrics.get(t)
            if ma is None or mb is None or ma.in_floors is None or mb.in_floors is None:
                continue
            if math.isnan(ma.in_floors) or math.isnan(mb.in_floors):
                continue
            if ma.in_floors > 0 and mb.in_floors > 0 and math.isfinite(ma.in_floors) and math.isfinite(mb.in_floors):
                spread = max(spread, ma.in_floors / mb.in_floors, mb.in_floors / ma.in_floors)
            r = _ratio(ma.in_floors, mb.in_floors, min_floors)
            if r > factor:
                regressions.append({**case_line(rb), "tensor": t, "a": ma.in_floors, "b": mb.in_floors, "ratio": r})
    regressions.sort(key=lambda x: x["ratio"], reverse=True)

    ga: dict[tuple, list[CaseResult]] = defaultdict(list)
    gb: dict[tuple, list[CaseResult]] = defaultdict(list)
    for r in a:
        ga[group_key(r)].append(r)
    for r in b:
        gb[group_key(r)].append(r)
    groups = []
    for k in sorted(set(ga) | set(gb)):
        row = {"backend": k[0], "op": k[1], "dtype": k[2],
               "fail_a": sum(outcome(r) == "fail" for r in ga.get(k, [])),
               "fail_b": sum(outcome(r) == "fail" for r in gb.get(k, []))}
        for t in TENSORS:
            sa = _stats([r.metrics[t].in_floors for r in ga.get(k, []) if t in r.metrics])
            sb = _stats([r.metrics[t].in_floors for r in gb.get(k, []) if t in r.metrics])
            row[t] = {"a": sa and sa["median"], "b": sb and sb["median"],
                      "a_max": sa and sa["max"], "b_max": sb and sb["max"]}
        groups.append(row)
    return {
        "factor": factor, "min_floors": min_floors,
        "pairs": len(set(A) & set(B)), "only_a": len(set(A) - set(B)), "only_b": len(set(B) - set(A)),
        "identical": identical, "max_spread": spread,
        "regressions": regressions, "new_failures": new_f, "fixed_failures": fixed_f,
        "status_changes": changes, "groups": groups,
        "regressed": bool(regressions or new_f),
    }
