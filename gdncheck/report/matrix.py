"""Capability matrix: backend x feature, built from a run's results and judged by the gate.

A cell covers the results of one backend whose case has the feature (a case has many
features, so it counts in several cells). Cell values, worst first:

- ``wrong k/n``: k of the n cases that ran fail the gate (budgets or hard contracts), or
  ended ``nan`` / ``crash`` / ``error``; the check that failed most is named;
- ``ok n``: every case that ran passes;
- ``unsupported``: none ran; the most common reason is given;
- ``–``: no case of the run has the feature.

Cells with both ran and unsupported cases say how many were unsupported.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

from gdncheck.data.case import Case
from gdncheck.data.results import CaseResult

# feature -> predicate over a case; the order is the table's column order
FEATURES: dict[str, Callable[[Case], bool]] = {
    "prefill": lambda c: c.op == "prefill",
    "decode T=1": lambda c: c.op == "decode",
    "verify T>1": lambda c: c.op == "verify",
    "bf16 io": lambda c: c.dtype == "bfloat16",
    "fp16 io": lambda c: c.dtype == "float16",
    "fp32 io": lambda c: c.dtype == "float32",
    "fp32 state": lambda c: c.state_dtype == "float32",
    "bf16 state": lambda c: c.state_dtype == "bfloat16",
    "fp16 state": lambda c: c.state_dtype == "float16",
    "k_last": lambda c: c.layout == "k_last",
    "v_last": lambda c: c.layout == "v_last",
    "GVA (HV > H)": lambda c: c.HV > c.H,
    "GQA (H > HV)": lambda c: c.H > c.HV,
    "varlen (N > 1)": lambda c: c.op == "prefill" and c.N > 1,
    "zero-length seq": lambda c: any(t == 0 for t in c.seqlens),
    "T > 64 (chunks)": lambda c: max(c.seqlens, default=0) > 64,
    "pool": lambda c: c.pool_size is not None,
    "-1 padding": lambda c: any(i < 0 for i in (c.read_indices or [])),
    "write != read": lambda c: c.write_indices is not None and c.write_indices != c.read_indices,
    "slot >= 4096": lambda c: max([*(c.read_indices or []), *(c.write_indices or [])], default=-1) >= 4096,
    "strided pool": lambda c: c.pool_strided,
    "strided gates": lambda c: c.gate_strided,
    "raw gates": lambda c: c.gate_source == "raw",
    "precomputed gates": lambda c: c.gate_source == "precomputed",
    "no l2norm": lambda c: not c.l2norm,
    "intermediate": lambda c: c.intermediate,
    "disable_state_update": lambda c: c.disable_state_update,
}


def _short(reason: str, backend: str) -> str:
    r = reason.removeprefix(backend).strip(" :")
    r = r.removeprefix("does not support ").strip()
    return (r[:60] + "…") if len(r) > 61 else r


def cell(results: list[CaseResult], judge: Callable[[CaseResult], list]) -> dict:
    """Counts and the text of one cell. ``judge(r)`` -> the gate's findings (empty = pass)."""
    ran = [r for r in results if r.status != "unsupported"]
    unsup = [r for r in results if r.status == "unsupported"]
    bad: list[tuple[CaseResult, list]] = [(r, f) for r in ran if (f := judge(r))]
    d = {"cases": len(results), "ran": len(ran), "unsupported": len(unsup), "wrong": len(bad)}
    if not results:
        d["text"] = "–"
    elif not ran:
        reason = Counter(_short(r.reason or "", r.backend) for r in unsup).most_common(1)[0][0]
        d["text"] = f"unsupported ({reason})"
    elif bad:
        checks = Counter(x.check for _, fs in bad for x in fs[:1])
        d["checks"] = dict(checks)
        d["text"] = f"**wrong {len(bad)}/{len(ran)}** ({checks.most_common(1)[0][0]})"
    else:
        d["text"] = f"ok {len(ran)}"
    if ran and unsup:
        d["text"] += f"; {len(unsup)} unsup."
    return d


def build(results: list[CaseResult], judge: Callable[[CaseResult], list], order: list[str] = ()) -> dict:
    """``{"backends": [...], "features": [...], "cells": {feature: {backend: cell}}}``; backends in
    ``order`` (e.g. the run headers' lists), then any others as they first appear."""
    seen = {r.backend for r in results}
    backends = list(dict.fromkeys([b for b in order if b in seen] + [r.backend for r in results]))
    versions = {b: sorted({r.backend_version for r in results if r.backend == b and r.backend_version}) for b in backends}
    cells = {}
    for feat, pred in FEATURES.items():
        row = {}
        for b in backends:
            row[b] = cell([r for r in results if r.backend == b and pred(r.case)], judge)
        cells[feat] = row
    return {"backends": backends, "versions": versions, "features": list(FEATURES), "cells": cells}


def markdown(m: dict) -> str:
    """The matrix as a Markdown table, features as rows, backends as columns."""
    vers = m.get("versions", {})
    head = [b + (f" ({', '.join(vers[b])})" if vers.get(b) else "") for b in m["backends"]]
    lines = ["| feature | " + " | ".join(head) + " |", "|---" * (len(m["backends"]) + 1) + "|"]
    for feat in m["features"]:
        lines.append(f"| {feat} | " + " | ".join(m["cells"][feat][b]["text"] for b in m["backends"]) + " |")
    return "\n".join(lines) + "\n"
