"""Known findings as regressions: per kernel package version, is each README finding still failing or fixed?

The ``findings`` suite tags each trigger case ``finding:N`` and ``on:<backend>`` (the backends that
show it; :func:`gdncheck.judge.findings_of`, the rule every verdict's known findings follow too).
:func:`status_table` reads results (any number of ``results.jsonl``, e.g. one per FlashInfer version)
and judges each (finding, backend, version) with the gate's own judge (budgets and contracts):
``still failing`` when any of its cases fails, ``fixed`` when all that ran pass, ``not run`` when
none ran (unsupported or absent). Cases tagged ``metric-only`` (findings 6, 7: distances, not
contracts) report ``within budget`` / ``over budget``.

    python -m gdncheck.findings RESULTS.jsonl [RESULTS.jsonl ...]   # Markdown table on stdout
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from gdncheck.budgets import load_budgets
from gdncheck.data.io import load_results
from gdncheck.judge import findings_of
from gdncheck.judge import judge_result as judge


def status_table(results) -> dict[tuple[str, str, str], tuple[str, list[str]]]:
    """``{(finding, backend, version): (verdict, [case names that fail])}`` for tagged results."""
    budgets = load_budgets()
    groups: dict[tuple[str, str, str], list] = defaultdict(list)
    for r in results:
        for f in findings_of(r):
            groups[(f, r.backend, r.backend_version)].append(r)
    out = {}
    for key, rs in sorted(groups.items()):
        ran = [r for r in rs if r.status != "unsupported"]
        failing = [r.case.name for r in ran if judge(r, budgets)]
        metric_only = any("metric-only" in r.case.tags for r in rs)
        if not ran:
            verdict = "not run (" + (rs[0].reason or "unsupported")[:80] + ")"
        elif metric_only:
            verdict = "over budget" if failing else "within budget"
        else:
            verdict = "still failing" if failing else "fixed"
        out[key] = (verdict, failing)
    return out


def markdown(table) -> str:
    lines = ["| finding | backend | version | verdict | failing cases |", "|---|---|---|---|---|"]
    for (f, b, v), (verdict, failing) in table.items():
        lines.append(f"| {f} | {b} | {v} | **{verdict}** | {', '.join(failing[:4])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not paths:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    results = [r for p in paths for r in load_results(p)[1]]
    print(markdown(status_table(results)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
