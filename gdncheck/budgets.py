"""Precision budgets: ``metric <= max`` per backend x op x dtype x state dtype, from ``budgets.toml``.

The shipped file states the error model the numbers come from; ``--budgets FILE`` merges more
entries over it (for each metric the most specific matching entry wins, ties go to the later file).
"""
from __future__ import annotations

import fnmatch
import hashlib
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

from gdncheck.data.errors import UsageError
from gdncheck.data.results import CaseResult

TENSORS = ("o", "state", "intermediate")
# Metric fields a budget may bound (smaller is better for each).
FIELDS = ("in_floors", "in_twins", "rel_l2", "max_abs", "max_rel", "ulp_p50", "ulp_p99", "ulp_max")
_KEYS = ("backend", "op", "dtype", "state_dtype")
_BUDGET_FIELDS = {*_KEYS, "metric", "max", "why"}


class BudgetsError(UsageError):
    """A budgets file is missing or malformed: names the file, the entry and the problem."""


@dataclass(frozen=True)
class Budget:
    """``metric <= max`` for results matching the key patterns (``fnmatch``; ``"*"`` = any)."""

    metric: str
    max: float
    backend: str = "*"
    op: str = "*"
    dtype: str = "*"
    state_dtype: str = "*"
    why: str = ""
    source: str = ""

    @property
    def tensor(self) -> str:
        return self.metric.split(".", 1)[0]

    @property
    def field(self) -> str:
        return self.metric.split(".", 1)[1]

    def matches(self, r: CaseResult, backend: str | None = None) -> bool:
        vals = (backend or r.backend, r.case.op, r.case.dtype, r.case.state_dtype)
        return all(fnmatch.fnmatchcase(v, p) for v, p in zip(vals, self.patterns))

    @property
    def patterns(self) -> tuple[str, ...]:
        return (self.backend, self.op, self.dtype, self.state_dtype)

    @property
    def specificity(self) -> int:
        # exact name 2, glob 1, "*" 0 per key: an entry naming a backend beats a wildcard one
        return sum(0 if p == "*" else 1 if any(ch in p for ch in "*?[") else 2 for p in self.patterns)


class Budgets:
    """Budget entries in load order. For each metric the most specific matching entry wins; among
    equally specific ones the later (an override file's) wins."""

    def __init__(self, entries: list[Budget], files: list[str]):
        self.entries, self.files = entries, files

    @property
    def digest(self) -> str:
        """sha256[:16] of the budget entries in force (part of a run's fingerprint)."""
        blob = "\n".join(repr((b.metric, b.max, b.patterns)) for b in self.entries)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def for_result(self, r: CaseResult, backend: str | None = None) -> dict[str, Budget]:
        """Budget per metric for ``r`` (looked up as ``backend`` when given)."""
        best: dict[str, tuple[int, int, Budget]] = {}
        for i, b in enumerate(self.entries):
            if b.matches(r, backend):
                rank = (b.specificity, i)
                if b.metric not in best or rank > best[b.metric][:2]:
                    best[b.metric] = (*rank, b)
        return {m: v[2] for m, v in best.items()}


def default_budgets_path() -> Path:
    return Path(str(resources.files("gdncheck").joinpath("budgets.toml")))


def _parse_budgets(path: Path) -> list[Budget]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise BudgetsError(f"budgets file {path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise BudgetsError(f"budgets file {path}: malformed TOML: {e}") from None
    unknown = set(data) - {"budget", "description"}
    if unknown:
        raise BudgetsError(f"budgets file {path}: unknown top-level key(s) {sorted(unknown)}; "
                              "expected [[budget]] tables")
    entries = data.get("budget", [])
    if not isinstance(entries, list):
        raise BudgetsError(f"budgets file {path}: 'budget' must be an array of tables ([[budget]])")
    out = []
    for i, e in enumerate(entries):
        where = f"budgets file {path}: [[budget]] #{i + 1}"
        if not isinstance(e, dict):
            raise BudgetsError(f"{where}: expected a table")
        bad = set(e) - _BUDGET_FIELDS
        if bad:
            raise BudgetsError(f"{where}: unknown key(s) {sorted(bad)}; allowed: {sorted(_BUDGET_FIELDS)}")
        metric = e.get("metric")
        if not isinstance(metric, str) or metric.count(".") != 1:
            raise BudgetsError(f"{where}: 'metric' must be '<tensor>.<field>', e.g. 'o.in_floors'; got {metric!r}")
        t, f = metric.split(".")
        if t not in TENSORS or f not in FIELDS:
            raise BudgetsError(f"{where}: metric {metric!r}: tensor must be one of {list(TENSORS)}, "
                                  f"field one of {list(FIELDS)}")
        mx = e.get("max")
        if isinstance(mx, bool) or not isinstance(mx, (int, float)) or math.isnan(mx) or mx < 0:
            raise BudgetsError(f"{where} ({metric}): 'max' must be a number >= 0 (inf disables); got {mx!r}")
        for k in _KEYS:
            if not isinstance(e.get(k, "*"), str):
                raise BudgetsError(f"{where} ({metric}): '{k}' must be a string pattern; got {e[k]!r}")
        out.append(Budget(metric=metric, max=float(mx), why=str(e.get("why", "")), source=f"{path.name}#{i + 1}",
                          **{k: e.get(k, "*") for k in _KEYS}))
    return out


def load_budgets(overrides: Iterable[str | Path] = (), *, defaults: bool = True) -> Budgets:
    """The shipped defaults, then each override file merged over them (later wins ties)."""
    files = ([default_budgets_path()] if defaults else []) + [Path(p) for p in overrides]
    entries: list[Budget] = []
    for p in files:
        if not p.exists():
            raise BudgetsError(f"budgets file {p}: not found")
        entries += _parse_budgets(p)
    return Budgets(entries, [str(p) for p in files])
