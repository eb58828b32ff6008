"""The results schema (pydantic): one :class:`CaseResult` per (case, backend), streamed as JSONL
after a :class:`RunHeader` line. Version 2 adds the run's plan and fingerprint to the header;
version 1 files (no plan) still load, and say so wherever their evidence is counted."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gdncheck.data.case import Case

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

Status = Literal["ok", "unsupported", "error", "nan", "crash"]


class TensorMetrics(BaseModel):
    """Distance of one output tensor (output, state/pool rows, intermediate) to the oracle.

    Computed over the elements the oracle defines (class ORACLE / WRITTEN), in float64.
    Infinite ratios (a zero floor with a non-zero error) serialise as JSON ``Infinity``.
    """

    model_config = ConfigDict(ser_json_inf_nan="constants")

    count: int = Field(0, description="elements compared")
    rel_l2: float | None = Field(None, description="RMS error / RMS reference")
    max_abs: float | None = None
    max_rel: float | None = Field(None, description="max |err| / max(|ref|, floor)")
    cosine: float | None = None
    ulp_p50: float | None = Field(None, description="ULP distance in the tensor's dtype, median")
    ulp_p99: float | None = None
    ulp_max: float | None = None
    nan: int = 0
    inf: int = 0
    unwritten: int = Field(0, description="elements still holding the NaN poison")
    floor_rel_l2: float | None = Field(None, description="rel_l2 of the oracle rounded to this dtype")
    twin_rel_l2: float | None = Field(None, description="rel_l2 of the precision twin")
    in_floors: float | None = Field(None, description="rel_l2 / floor_rel_l2")
    in_twins: float | None = Field(None, description="rel_l2 / twin_rel_l2")


class Contracts(BaseModel):
    """Hard contracts: no budget, any violation fails."""

    untouched_rows: int = Field(0, description="pool rows the call must not touch")
    untouched_changed: list[int] = Field(default_factory=list, description="of those, rows not bit-identical")
    padded_ok: bool | None = Field(None, description="padded rows as the declared policy says; None = no padding")
    padded_details: list[str] = Field(default_factory=list)
    unwritten: int = Field(0, description="output/state elements the call had to write but left poisoned")
    nan_where_finite: int = Field(0, description="NaN/Inf where the oracle is finite")
    state_written: bool | None = Field(None, description="final state / pool rows written where the API says")
    details: list[str] = Field(default_factory=list, description="what failed, in words")
    redzone: list[str] = Field(default_factory=list, description=(
        "guards around the backend's buffers that changed: tensor, side (before/after/hole), first offset"))
    inputs_modified: list[str] = Field(default_factory=list, description=(
        "input-only tensors (q, k, v, gates, indices) not bit-identical after the call"))

    @property
    def ok(self) -> bool:
        return (not self.untouched_changed and self.padded_ok is not False and self.unwritten == 0
                and self.nan_where_finite == 0 and self.state_written is not False
                and not self.redzone and not self.inputs_modified)


class Timing(BaseModel):
    compile_s: float | None = Field(None, description="first call of a new compile key, minus run time")
    run_s: float | None = None
    oracle_s: float | None = None
    wall_s: float | None = Field(None, description="the whole case in its worker: inputs, kernel, oracle, twin, metrics")
    start_s: float | None = Field(None, description="seconds from the run's start to the case's start (parallel runs)")
    peak_gib: float | None = Field(None, description="peak device memory the worker allocated for the case (CUDA)")


class SanitizerFinding(BaseModel):
    """One error or warning of compute-sanitizer, parsed from its report (``gdncheck.sanitize``)."""

    severity: Literal["error", "api", "warning", "note"] = Field(
        "error", description="api: a host API call returned an error (reported apart, not a memory access)")
    kind: str = Field("", description="e.g. 'Invalid __global__ write', 'Uninitialized __global__ memory read', "
                                      "'race Write/Read', 'api cudaErrorIllegalAddress'")
    access: str | None = Field(None, description="read, write or atomic")
    space: str | None = Field(None, description="global, shared, local, generic")
    size: int | None = Field(None, description="bytes per access")
    kernel: str | None = None
    location: str | None = Field(None, description="source file:line or kernel+offset the tool names")
    thread: list[int] | None = None
    block: list[int] | None = None
    address: str | None = None
    address_note: str | None = Field(None, description="what the tool says of the address: out of bounds, misaligned...")
    nearest_allocation: str | None = Field(None, description="'N bytes after|before the nearest allocation at 0x.. of size M'")
    buffer: str | None = Field(None, description="the address relative to the case's named buffers, where it maps")
    hazards: int | None = Field(None, description="racecheck: hazards of this report line")
    text: str = Field("", description="the report's lines of this finding (host backtrace left out)")

    def summary(self) -> str:
        parts = [self.kind or "finding"]
        if self.size:
            parts[0] += f" of size {self.size}"
        if self.kernel:
            parts.append(f"in {self.kernel[:80]}")
        if self.thread and self.block:
            parts.append(f"thread {tuple(self.thread)} block {tuple(self.block)}")
        if self.address:
            parts.append(f"at {self.address}" + (f" ({self.buffer})" if self.buffer else ""))
        return " ".join(parts)


class SanitizerReport(BaseModel):
    """compute-sanitizer's verdict on one case run in its own process under ``--tool``."""

    tool: str
    command: str = ""
    exit_code: int | None = None
    errors: int = Field(0, description="memory, race and initialisation errors: the tool's ERROR SUMMARY less its "
                        "API errors, at least the parsed ones")
    api_errors: int = Field(0, description="host API calls that returned an error (cuGetProcAddress probes at import)")
    warnings: int = 0
    summary: str = Field("", description="the tool's summary line")
    findings: list[SanitizerFinding] = Field(default_factory=list)
    dropped: int = Field(0, description="findings parsed but not kept (over the cap)")
    log: str | None = Field(None, description="file with the whole report")


class CaseResult(BaseModel):
    """One case on one backend."""

    schema_version: int = SCHEMA_VERSION
    case_id: str
    case: Case
    backend: str
    backend_version: str = ""
    status: Status
    reason: str | None = Field(None, description="unsupported reason, exception text, crash signal")
    path: str = Field("", description="kernel path taken")
    policy: str | None = Field(None, description="padding policy the backend declared for this path")
    adapter_work: list[str] = Field(default_factory=list)
    metrics: dict[str, TensorMetrics] = Field(default_factory=dict, description="keys: o, state, intermediate")
    contracts: Contracts | None = None
    timing: Timing = Field(default_factory=Timing)
    device: str = ""
    worker: str = ""
    repro: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)
    sanitizer: SanitizerReport | None = Field(None, description="set when the case ran under compute-sanitizer")


class Environment(BaseModel):
    gpu: str | None = None
    driver: str | None = None
    cuda: str | None = None
    torch: str | None = None
    triton: str | None = None
    flashinfer: str | None = None
    fla: str | None = None
    sglang: str | None = None
    vllm: str | None = None
    gdncheck: str | None = None
    git_rev: str | None = None
    python: str | None = None
    host: str | None = None
    command: str | None = None
    seeds: list[int] = Field(default_factory=list)


class Fingerprint(BaseModel):
    """What a run's results depend on besides the cases' own fields: a resumed run must match it.

    ``backends`` maps each backend name to the hash of the source file that defines it (plugins
    included), so an edited kernel adapter or plugin is never resumed into stale results.
    """

    gdncheck: str | None = None
    git_rev: str | None = None
    packages: dict[str, str | None] = Field(default_factory=dict, description="kernel and compiler package versions")
    backends: dict[str, str] = Field(default_factory=dict, description="backend name -> sha256[:16] of its source")
    budgets: str | None = Field(None, description="sha256[:16] of the budgets files in force")
    plan: str | None = Field(None, description="sha256[:16] of the planned (case id, backend) pairs")
    device: str | None = None

    def differs(self, other: "Fingerprint") -> str | None:
        """The first field in which ``other`` differs, in words, or None."""
        for name in type(self).model_fields:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                if isinstance(a, dict) and isinstance(b, dict):
                    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                    return f"{name}: {', '.join(f'{k} {a.get(k)} -> {b.get(k)}' for k in keys[:3])}"
                return f"{name}: {a} -> {b}"
        return None


class RunHeader(BaseModel):
    """First line of a results JSONL file."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["header"] = "header"
    run_id: str
    suites: list[str]
    backends: list[str]
    environment: Environment
    shard: str | None = Field(None, description="'i/n' when this file holds one shard of a run")
    shards: list[str] = Field(default_factory=list, description="the shards a merged file was made from")
    jobs: int = Field(1, description="worker processes sharing the device (their case times overlap)")
    planned: list[tuple[str, str]] | None = Field(
        None, description="(case id, backend) pairs the run set out to judge; None in version 1 files")
    fingerprint: Fingerprint | None = None
