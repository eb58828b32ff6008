"""Drift schemas: error against position and along decode rollouts (written by ``gdncheck drift``)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from gdncheck.data.case import Case

DRIFT_SCHEMA_VERSION = 1

class PositionCurve(BaseModel):
    """Output error per position bin of one long prefill on one backend."""

    backend: str
    status: Literal["ok", "unsupported", "error"] = "ok"
    reason: str | None = None
    case: Case | None = None
    T: int
    bin_edges: list[int] = Field(default_factory=list, description="bins+1 token positions")
    rel_l2: list[float] = Field(default_factory=list, description="per bin, output vs oracle")
    floor_rel_l2: list[float] = Field(default_factory=list, description="per bin, oracle rounded to dtype")
    flip_rate: float | None = None
    vocab: int | None = None
    path: str = ""
    seconds: float | None = None


class RolloutCurve(BaseModel):
    """State and output error along a decode rollout on one backend and state dtype."""

    backend: str
    status: Literal["ok", "unsupported", "error"] = "ok"
    reason: str | None = None
    case: Case | None = None
    state_dtype: str
    steps: int
    log_steps: list[int] = Field(default_factory=list, description="steps (1-based) where errors were taken")
    state_rel_l2: list[float] = Field(default_factory=list)
    state_floor: list[float] = Field(default_factory=list, description="float64 state rounded once to state_dtype")
    o_rel_l2: list[float] = Field(default_factory=list, description="output error over the steps since the previous point")
    growth: float | None = Field(None, description="slope of log state error vs log step (steps >= 10)")
    growth_o: float | None = None
    flip_rate: float | None = None
    vocab: int | None = None
    path: str = ""
    seconds: float | None = None


class DriftResult(BaseModel):
    schema_version: int = DRIFT_SCHEMA_VERSION
    kind: Literal["drift"] = "drift"
    device: str = ""
    position: list[PositionCurve] = Field(default_factory=list)
    rollout: list[RolloutCurve] = Field(default_factory=list)


def load_drift(path: str | Path) -> DriftResult:
    return DriftResult.model_validate_json(Path(path).read_text())
