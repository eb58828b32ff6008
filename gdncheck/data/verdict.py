"""The verdict schema: why a result fails, what a run's evidence amounts to, and the decision.

Written by :mod:`gdncheck.judge` only; every command and report renders these objects.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FindingKind = Literal["status", "contract", "budget", "missing", "now-fails", "regression", "now-passes", "improved"]


class Finding(BaseModel):
    """One reason a result fails (or, in ``improvements``, got better)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    kind: FindingKind
    check: str = Field(description='e.g. "o.in_floors", "contract:untouched_rows", "status:crash"')
    backend: str
    case_id: str
    case: str = Field(description="case name, or its id")
    op: str = ""
    dtype: str = ""
    value: float | None = None
    limit: float | None = Field(None, description="the budget, or the baseline value times the factor")
    severity: float = Field(math.inf, description="value / limit; inf for status and contracts")
    detail: str = ""
    repro: str = ""


class MetricCheck(BaseModel):
    """One budgeted metric of a result beside its budget."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    metric: str
    value: float | None
    budget: float
    source: str = ""
    why: str = ""

    @property
    def headroom(self) -> float | None:
        """``budget / value``: how many times the value could grow before it fails (inf at 0)."""
        if self.value is None or math.isnan(self.value):
            return None
        return math.inf if self.value == 0 else self.budget / self.value


class Evidence(BaseModel):
    """What a verdict rests on: pairs planned, judged, unsupported (with reasons) and missing."""

    planned: int | None = Field(None, description="pairs the run set out to judge; None when the file does not say")
    results: int = 0
    judged: int = Field(0, description="results that ran and were judged (pass + fail)")
    passed: int = 0
    failed: int = 0
    unsupported: int = 0
    unsupported_reasons: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="backend -> reason -> pairs")
    missing: list[tuple[str, str]] = Field(default_factory=list, description="planned (case id, backend) without a result")
    unplanned: int = Field(0, description="results for pairs the plan does not name (ignored)")
    shards: list[str] = Field(default_factory=list)


class BaselineEvidence(BaseModel):
    """How much of a run a baseline comparison covered."""

    path: str | None = None
    environment: dict = Field(default_factory=dict)
    compared: int = Field(0, description="pairs judged in both runs")
    only_in_run: int = 0
    only_in_baseline: int = 0
    identical: int = Field(0, description="compared pairs with bit-identical metrics")
    overlap: float = Field(0.0, description="compared / pairs judged in the run")
    min_overlap: float = 0.0
    factor: float = 1.5


class KnownFinding(BaseModel):
    """A documented finding kept as a regression case (tag ``finding:N``): its state in this run."""

    finding: str
    state: Literal["still failing", "fixed", "not run"]
    backends: dict[str, str] = Field(default_factory=dict, description="backend -> still failing / fixed / not run")
    cases: list[str] = Field(default_factory=list)


class Verdict(BaseModel):
    """The decision over a run: exit code, failures worst first, baseline changes, evidence."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    exit_code: int
    failures: list[Finding] = Field(default_factory=list)
    regressions: list[Finding] = Field(default_factory=list)
    improvements: list[Finding] = Field(default_factory=list)
    evidence: Evidence = Field(default_factory=Evidence)
    baseline: BaselineEvidence | None = None
    known: list[KnownFinding] = Field(default_factory=list)
    messages: list[str] = Field(default_factory=list, description="why the exit code is what it is, in words")

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    @property
    def word(self) -> str:
        return {0: "PASS", 1: "FAIL", 2: "CONFIGURATION ERROR", 3: "NOTHING JUDGED"}.get(self.exit_code, "ERROR")
