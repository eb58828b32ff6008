"""The compile-unit cost model: fit it from results files, or show predicted shard costs and walls.

    python scripts/shard_costs.py fit RESULTS... [--out gdncheck/costs.toml]
    python scripts/shard_costs.py show -s smoke -s models -s edges -b BACKEND... [-n 2 -n 4]
"""
import argparse
import sys
from pathlib import Path
from typing import Sequence

from gdncheck.shard import (COSTS_PATH, Unit, assign, fit, lanes_wall, load_costs, plan_units, split_for_lanes,
                            write_costs)


def main(argv: list[str] | None = None) -> int:
    """``python -m gdncheck.shard fit RESULTS... [--out PATH]`` or ``show SUITE... -b B... -n N``."""
    import argparse

    ap = argparse.ArgumentParser(prog="scripts/shard_costs.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="refit the cost model from results files")
    f.add_argument("results", nargs="+")
    f.add_argument("--out", default=str(COSTS_PATH))
    s = sub.add_parser("show", help="predicted shard costs of suites x backends")
    s.add_argument("suites", nargs="+")
    s.add_argument("-b", "--backend", action="append", required=True)
    s.add_argument("-n", type=int, action="append", default=None)
    s.add_argument("-j", "--jobs", type=int, default=12, help="lanes per GPU for the predicted wall")
    s.add_argument("--setup-s", type=float, default=15.0, help="start-up before the first case")
    s.add_argument("--budget-gib", type=float, default=0.7 * 80,
                   help="lanes' memory budget (70%% of an 80 GiB GPU): cases past it run alone at the end")
    a = ap.parse_args(argv)
    if a.cmd == "fit":
        entries = fit(a.results)
        write_costs(entries, [Path(p).as_posix() for p in a.results], a.out)
        for name, e in entries.items():
            print(f"{name:26s} " + " ".join(f"{k}={v}" for k, v in e.items()))
        return 0
    from gdncheck.backends import load_backend
    from gdncheck.execute import case_bytes
    from gdncheck.run import plan

    costs = load_costs()
    pairs = plan(a.suites, [load_backend(x) for x in a.backend])
    units = plan_units(pairs, costs)
    total = sum(u.cost for u in units)
    budget = a.budget_gib * 2**30

    def wall(us: Sequence[Unit]) -> float:
        """Setup, the lanes, then the cases past the budget one at a time (as ``run`` does;
        their kernels are compiled by then)."""
        mine = [(b, c) for u in us for b, c in u.pairs]
        alone = [(b, c) for b, c in mine if case_bytes(c) > budget]
        rest = plan_units([(b, c) for b, c in mine if case_bytes(c) <= budget], costs)
        return (a.setup_s + lanes_wall(split_for_lanes(rest, a.jobs, costs), a.jobs)
                + sum(costs.case_cost(b, c) for b, c in alone))

    one = wall(units)
    print(f"{len(pairs)} pairs, {len(units)} units, predicted {total:.0f} s of worker time; "
          f"one GPU, -j {a.jobs}: {one:.0f} s")
    for n in a.n or [2, 4, 8]:
        shards = assign(units, n)
        loads = [sum(u.cost for u in s) for s in shards]
        print(f"n={n}: shard costs {', '.join(f'{x:.0f}' for x in loads)} s; "
              f"max/mean {max(loads) / (sum(loads) / n):.3f}; biggest unit {max(u.cost for u in units):.0f} s; "
              f"{n} GPUs, -j {a.jobs}: {max(wall(s) for s in shards):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
