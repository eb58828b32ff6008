"""Engine-path parity: an engine's Triton path and its FlashInfer path on identical inputs.

For each case both paths support, the inputs are built once, each path runs on its own copy, and
the report gives, in floors (rel-L2 of the oracle's result rounded once to the stored dtype), the
distance of the two outputs (and of the written state rows) to each other and each to the float64
oracle. This is the check engine developers run by hand when they bring up a second path: two
paths that each sit at 1-3 floors from the oracle but 5 floors from each other disagree in a way
neither error alone shows.

    python -m gdncheck.engine_parity --engine sglang -s smoke -s models -s edges --device cuda --out DIR

Pairs (``PAIRS``): SGLang decode (packed Triton vs FlashInfer gather/scatter), verify (fused
sigmoid vs MTP), prefill (Triton chunk vs FlashInfer chunk); vLLM prefill (Triton chunk vs
FlashInfer chunk). Writes ``DIR/parity.jsonl`` and ``DIR/parity.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from gdncheck.backends import Backend, load_backend
from gdncheck.data.case import Case
from gdncheck.inputs import DTYPES, materialize
from gdncheck.suites import load_suite
from gdncheck.oracle import expected
from gdncheck_reference import OUT_ORACLE, ROW_WRITTEN

PAIRS = {
    "sglang": [("sglang-decode", "sglang-flashinfer-decode"), ("sglang-fused-sigmoid", "sglang-flashinfer-verify"),
               ("sglang-extend", "sglang-flashinfer-extend")],
    "vllm": [("vllm-chunk", "vllm-flashinfer-prefill")],
}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    n = ref.double().norm().item()
    d = torch.nan_to_num(x.double() - ref.double(), nan=math.inf).norm().item()
    return d / n if n else (0.0 if d == 0 else math.inf)


def compare(a: Backend, b: Backend, case: Case, device: str = "cuda") -> dict:
    """Run ``a`` and ``b`` on identical inputs of ``case``; distances in floors.

    Returns ``{"case", "a", "b", "o": {"a_oracle", "b_oracle", "a_b"}, "state": {...}}`` (state
    only where both write pool rows the oracle checks), or ``{"skipped": reason}``.
    """
    for be in (a, b):
        why = be.available() or be.supports(case)
        if why:
            return {"case": case.id, "a": a.name, "b": b.name, "skipped": why}
    if case.padded_rows and a.policy(case) != b.policy(case):
        return {"case": case.id, "a": a.name, "b": b.name, "skipped": "padding policies differ"}
    inputs = materialize(case, device)
    before = inputs.clone()
    oa, ob = a.run(inputs.clone()), b.run(inputs.clone())
    exp = expected(before, a.policy(case), a.zero_length_policy)
    tok = (exp.o_class == OUT_ORACLE).to(oa.o.device)
    ref = exp.o.to(oa.o.device)[tok]
    floor = _rel(ref.to(DTYPES[case.dtype]), ref)
    if not floor:  # every row padded, or an output the dtype holds exactly: no scale to measure in
        return {"case": case.id, "a": a.name, "b": b.name,
                "skipped": "no output element the oracle defines off the dtype's grid (all rows padded?)"}
    out = {"case": case.id, "name": case.name, "a": a.name, "b": b.name, "path_a": oa.path, "path_b": ob.path,
           "o": {"a_oracle": _rel(oa.o[tok], ref) / floor, "b_oracle": _rel(ob.o[tok], ref) / floor,
                 "a_b": (oa.o[tok].double() - ob.o[tok].double()).norm().item() / ref.norm().item() / floor}}
    w = (exp.row_class == ROW_WRITTEN).to(oa.o.device)
    if w.any() and oa.state is not None and ob.state is not None:
        sref = exp.pool.to(oa.o.device)[w]
        sfloor = _rel(sref.to(DTYPES[case.state_dtype]), sref)
        sa, sb = oa.state[w].double(), ob.state[w].double()
        if sfloor:  # else no written row off the dtype's grid: nothing to measure the states in
            out["state"] = {"a_oracle": _rel(sa, sref) / sfloor, "b_oracle": _rel(sb, sref) / sfloor,
                            "a_b": (sa - sb).norm().item() / sref.norm().item() / sfloor}
    return out


def run(engine: str, suites: list[str], device: str, out_dir: Path) -> list[dict]:
    """Every pair of ``engine`` over the cases of ``suites``; writes parity.jsonl and parity.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = [c for s in suites for c in load_suite(s)]
    rows = []
    with open(out_dir / "parity.jsonl", "w") as f:
        for an, bn in PAIRS[engine]:
            a, b = load_backend(an), load_backend(bn)
            for c in cases:
                try:
                    r = compare(a, b, c, device)
                except Exception as e:  # noqa: BLE001 - one failing case is a row, not a stop
                    r = {"case": c.id, "a": an, "b": bn, "error": f"{type(e).__name__}: {e}"[:500]}
                r["repro"] = c.repro()
                f.write(json.dumps(r) + "\n")
                f.flush()  # a crash of the process keeps the rows before it
                rows.append(r)
    ran = [r for r in rows if "o" in r]
    lines = [f"# Engine-path parity: {engine} ({', '.join(suites)}, {device})", "",
             f"{len(ran)} cases ran on both paths, {sum('skipped' in r for r in rows)} skipped, "
             f"{sum('error' in r for r in rows)} errors. Distances in floors (rel-L2 / one rounding of the "
             "oracle to the stored dtype); max over cases.", "",
             "| pair | cases | o: a-oracle | o: b-oracle | o: a-b | state: a-oracle | state: b-oracle | state: a-b |",
             "|---|---|---|---|---|---|---|---|"]
    for an, bn in PAIRS[engine]:
        rs = [r for r in ran if r["a"] == an and r["b"] == bn]
        if not rs:
            lines.append(f"| {an} / {bn} | 0 | | | | | | |")
            continue
        mx = lambda t, k: max((r[t][k] for r in rs if t in r), default=float("nan"))  # noqa: E731
        lines.append(f"| {an} / {bn} | {len(rs)} | " + " | ".join(
            f"{mx(t, k):.3g}" for t in ("o", "state") for k in ("a_oracle", "b_oracle", "a_b")) + " |")
    (out_dir / "parity.md").write_text("\n".join(lines) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=sorted(PAIRS), action="append", required=True)
    ap.add_argument("-s", "--suite", action="append", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="runs/parity")
    a = ap.parse_args(argv)
    for eng in a.engine:
        run(eng, a.suite or ["smoke"], a.device, Path(a.out) / eng)
        print((Path(a.out) / eng / "parity.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
