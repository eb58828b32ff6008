"""Compile work and wall time of sharded runs, measured and predicted from results files.

    python scripts/bench_shards.py --unsharded RUN/results.jsonl [--shards S0/results.jsonl S1/...]
                                   [-n 2 4 8] [--jobs 12]

Every run should start from empty kernel caches. Prints:

- measured (with ``--shards``): compile seconds summed over the shards against the unsharded
  run (target <= 1.1x), each shard's wall (its lanes' span) and the predicted wall of an N-GPU
  run, the slowest shard (shards measured one after another each had the GPU to themselves;
  with ``--side-by-side`` they shared one host, so the slowest shard bounds it from above);
- predicted from the unsharded run alone, for compile-unit shards (``gdncheck.shard``) and for
  the former hash shards: compile seconds summed over shards and the slowest shard's wall.

Prediction: a unit's pairs take what they took unsharded; a shard that holds part of a unit
pays, for the first compile key of that unit it meets, the unit's first compile of the unsharded
run (FLA autotuning, a CuTe DSL build), and for each further key what that key took. A shard's
units run on ``--jobs`` lanes, biggest first, each on the lane free first; cases past the
memory budget run alone afterwards; ``--setup-s`` covers start-up before the first case.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdncheck import shard as S  # noqa: E402
from gdncheck.data.io import read_lines  # noqa: E402
from gdncheck.execute import case_bytes  # noqa: E402


def rows(path: str | Path) -> list[dict]:
    """One dict per pair that ran: backend, case id, unit and compile keys, timing, bytes."""
    out = []
    for b, c, t, uk, ck, _ in S._result_rows([path]):
        out.append({"backend": b.name, "case_id": c.id, "unit": uk, "key": ck, "bytes": case_bytes(c),
                    "compile": t.get("compile_s") or 0.0, "wall": t.get("wall_s") or 0.0,
                    "start": t.get("start_s"), "pair": (b, c)})
    return out


def measured_wall(rs: list[dict]) -> float:
    """Span of a run's cases: the last case's end (``start_s + wall_s``; lanes' clock)."""
    ends = [r["start"] + r["wall"] for r in rs if r["start"] is not None]
    return max(ends) if ends else sum(r["wall"] for r in rs)


def predict(rs: list[dict], groups: list[list[dict]], jobs: int, budget: int, setup_s: float):
    """(compile seconds summed over ``groups``, predicted wall of each group) from unsharded ``rs``."""
    order = sorted(rs, key=lambda r: r["start"] or 0.0)
    key_cost: dict[tuple, float] = defaultdict(float)  # (backend, compile key) -> its compile
    unit_first: dict[tuple, float] = {}  # (backend, unit) -> the unit's first compile
    for r in order:
        if r["compile"]:
            key_cost[(r["backend"], r["key"])] += r["compile"]
            unit_first.setdefault((r["backend"], r["unit"]), r["compile"])
    rank = {id(r): i for i, r in enumerate(order)}
    compile_total = 0.0
    walls = []
    for g in groups:
        met_units: set = set()
        met_keys: set = set()
        units: dict[str, float] = defaultdict(float)
        alone = 0.0
        for r in sorted(g, key=lambda r: rank[id(r)]):
            u, k = (r["backend"], r["unit"]), (r["backend"], r["key"])
            comp = 0.0
            if k not in met_keys:  # the shard's first case of a compile key compiles it
                met_keys.add(k)
                comp = key_cost.get(k, 0.0)
                if u not in met_units:  # and the first of its unit pays the unit's first compile
                    comp = max(comp, unit_first.get(u, 0.0))
                met_units.add(u)
            compile_total += comp
            t = r["wall"] - r["compile"] + comp
            if r["bytes"] > budget:
                alone += t
            else:
                units[r["unit"]] += t
        lanes = [0.0] * jobs
        for d in sorted(units.values(), reverse=True):
            i = min(range(jobs), key=lambda j: lanes[j])
            lanes[i] += d
        walls.append(setup_s + max(lanes) + alone)
    return compile_total, walls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unsharded", required=True, help="results.jsonl of the unsharded run")
    ap.add_argument("--shards", nargs="*", default=[], help="results.jsonl of its shards 0..n-1")
    ap.add_argument("-n", type=int, nargs="*", default=[2, 4, 8], help="shard counts to predict")
    ap.add_argument("--jobs", type=int, default=None, help="lanes per GPU (default: the run's header)")
    ap.add_argument("--budget-gib", type=float, default=0.7 * 80, help="memory budget of the lanes (GiB)")
    ap.add_argument("--setup-s", type=float, default=15.0, help="start-up before the first case")
    ap.add_argument("--side-by-side", action="store_true",
                    help="the shards ran at the same time on one GPU, sharing its host (not one after another)")
    a = ap.parse_args(argv)

    header = json.loads(read_lines(a.unsharded)[0])
    jobs = a.jobs or header.get("jobs") or 1
    budget = int(a.budget_gib * 2**30)
    rs = rows(a.unsharded)
    comp = sum(r["compile"] for r in rs)
    wall = measured_wall(rs)
    print(f"unsharded: {a.unsharded}")
    print(f"  {len(rs)} pairs ran, compile {comp:.0f} s summed over lanes, cases span {wall:.0f} s "
          f"(lanes: {jobs})")
    _, (sim,) = predict(rs, [rs], jobs, budget, 0.0)
    print(f"  the model replays it in {sim:.0f} s (measured span {wall:.0f} s; calibration of the walls below)")

    if a.shards:
        srs = [rows(p) for p in a.shards]
        scomp = [sum(r["compile"] for r in s) for s in srs]
        swall = [measured_wall(s) for s in srs]
        n = len(srs)
        how = ("side by side on one GPU, each with its own lanes and empty caches" if a.side_by_side
               else "one after another, each from empty caches")
        print(f"\nmeasured, {n} compile-unit shards ({how}):")
        for i, (c, w) in enumerate(zip(scomp, swall)):
            print(f"  shard {i}/{n}: {len(srs[i])} pairs, compile {c:.0f} s, wall {w:.0f} s")
        ratio = sum(scomp) / comp if comp else float("nan")
        print(f"  compile summed over shards {sum(scomp):.0f} s vs unsharded {comp:.0f} s: "
              f"{ratio:.2f}x (target <= 1.1x) {'MET' if ratio <= 1.1 else 'NOT MET'}")
        bound = " (an upper bound: the shards shared one host)" if a.side_by_side else ""
        print(f"  predicted wall on {n} GPUs (slowest shard){bound}: {max(swall):.0f} s vs {wall:.0f} s on one: "
              f"{max(swall) / wall:.2f}x")

    print(f"\npredicted from the unsharded run (setup {a.setup_s:.0f} s, {jobs} lanes per GPU):")
    print(f"  {'n':>2}  {'split':<13} {'compile summed':>15} {'ratio':>6} {'slowest shard':>14} {'vs 1 GPU':>9}")
    one = a.setup_s + sim
    for n in a.n:
        by_unit = S.assign(S.plan_units([r["pair"] for r in rs]), n)
        where = {u.key: i for i, s in enumerate(by_unit) for u in s}
        for label, idx in (("compile unit", lambda r: where[r["unit"]]),
                           ("hash", lambda r: S.hash_shard(r["case_id"], r["backend"], n))):
            groups = [[] for _ in range(n)]
            for r in rs:
                groups[idx(r)].append(r)
            c, walls = predict(rs, groups, jobs, budget, a.setup_s)
            print(f"  {n:>2}  {label:<13} {c:>13.0f} s {c / comp:>5.2f}x {max(walls):>12.0f} s {max(walls) / one:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
