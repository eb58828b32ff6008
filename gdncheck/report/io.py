"""Results files: JSONL with a :class:`RunHeader` line then one :class:`CaseResult` per line."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from gdncheck.report.schema import SCHEMA_VERSION, CaseResult, RunHeader


class ResultsError(ValueError):
    """A results file cannot be read: names the file, the line and what is wrong."""


def _version_of(line: str) -> int | None:
    try:
        return json.loads(line).get("schema_version")
    except (ValueError, AttributeError):
        return None


def load_results(path: str | Path) -> tuple[RunHeader, list[CaseResult]]:
    """Read a results JSONL file.

    A truncated last line (a run killed mid-write) is dropped; a bad line elsewhere, a missing
    header or another schema version raises :class:`ResultsError`.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ResultsError(f"{path}: cannot read: {e.strerror}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ResultsError(f"{path}: empty, expected a header line")
    v = _version_of(lines[0])
    if v is not None and v != SCHEMA_VERSION:
        raise ResultsError(f"{path}: schema version {v}, this gdncheck reads version {SCHEMA_VERSION}")
    try:
        header = RunHeader.model_validate_json(lines[0])
    except ValidationError as e:
        raise ResultsError(f"{path}:1: not a run header: {e.errors()[0]['msg']}") from None
    results: list[CaseResult] = []
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            results.append(CaseResult.model_validate_json(line))
        except ValidationError as e:
            if i == len(lines):  # truncated tail of an interrupted run
                break
            v = _version_of(line)
            if v is not None and v != SCHEMA_VERSION:
                raise ResultsError(f"{path}:{i}: schema version {v}, expected {SCHEMA_VERSION}") from None
            raise ResultsError(f"{path}:{i}: not a case result: {e.errors()[0]['msg']}") from None
    return header, results


def write_results(path: str | Path, header: RunHeader, results: list[CaseResult]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(header.model_dump_json() + "\n")
        for r in results:
            f.write(r.model_dump_json() + "\n")


def result_key(r: CaseResult) -> tuple[str, str]:
    return (r.case_id, r.backend)


def merge_results(paths: list[str | Path]) -> tuple[RunHeader, list[CaseResult]]:
    """Join shards of one run: header from the first (suites/backends/seeds united), results in
    shard order; a (case, backend) seen twice keeps the later line (a resumed run's retry).
    Raises :class:`ResultsError` when shards differ in schema version."""
    if not paths:
        raise ResultsError("merge: no shards given")
    loaded = [(Path(p), *load_results(p)) for p in paths]
    versions = {h.schema_version for _, h, _ in loaded} | {r.schema_version for _, _, rs in loaded for r in rs}
    if len(versions) > 1:
        per = ", ".join(f"{p}: v{h.schema_version}" for p, h, _ in loaded)
        raise ResultsError(f"merge: schema versions differ ({per})")
    first = loaded[0][1]
    suites: list[str] = []
    backends: list[str] = []
    seeds: list[int] = []
    merged: dict[tuple[str, str], CaseResult] = {}
    for _, h, rs in loaded:
        suites += [s for s in h.suites if s not in suites]
        backends += [b for b in h.backends if b not in backends]
        seeds += [s for s in h.environment.seeds if s not in seeds]
        for r in rs:
            merged.pop(result_key(r), None)
            merged[result_key(r)] = r
    env = first.environment.model_copy(update={"seeds": seeds})
    header = first.model_copy(update={"suites": suites, "backends": backends, "environment": env, "shard": None})
    return header, list(merged.values())
