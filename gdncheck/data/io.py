"""Results files: JSONL with a :class:`RunHeader` line then one :class:`CaseResult` per line.

Files ending in ``.gz`` or ``.xz`` are read (and written) compressed: committed baselines stay small.
"""
from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

from pydantic import ValidationError

from gdncheck.data.errors import UsageError
from gdncheck.data.results import READABLE_VERSIONS, SCHEMA_VERSION, CaseResult, RunHeader


class ResultsError(UsageError):
    """A results file cannot be read or merged: names the file, the line and what is wrong."""


def _open(path: Path, mode: str):
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t")
    if path.suffix == ".xz":
        return lzma.open(path, mode + "t")
    return path.open(mode)


def _version_of(line: str) -> int | None:
    try:
        return json.loads(line).get("schema_version")
    except (ValueError, AttributeError):
        return None


def read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        with _open(path, "r") as f:
            return f.read().splitlines()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise ResultsError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def load_results(path: str | Path) -> tuple[RunHeader, list[CaseResult]]:
    """Read a results file (JSONL, optionally .gz/.xz).

    A truncated last line (a run killed mid-write) is dropped; a bad line elsewhere, a missing
    header or an unreadable schema version raises :class:`ResultsError`.
    """
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"{path}: results file not found")
    if path.is_dir():
        raise ResultsError(f"{path}: is a directory; give its results.jsonl")
    lines = read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ResultsError(f"{path}: empty, expected a header line")
    v = _version_of(lines[0])
    if v is not None and v not in READABLE_VERSIONS:
        raise ResultsError(f"{path}: schema version {v}, this gdncheck reads versions {list(READABLE_VERSIONS)}")
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
            if v is not None and v not in READABLE_VERSIONS:
                raise ResultsError(f"{path}:{i}: schema version {v}, expected one of {list(READABLE_VERSIONS)}") from None
            raise ResultsError(f"{path}:{i}: not a case result: {e.errors()[0]['msg']}") from None
    return header, results


def write_results(path: str | Path, header: RunHeader, results: list[CaseResult]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open(path, "w") as f:
        f.write(header.model_dump_json() + "\n")
        for r in results:
            f.write(r.model_dump_json() + "\n")


def result_key(r: CaseResult) -> tuple[str, str]:
    return (r.case_id, r.backend)


def latest(results: list[CaseResult]) -> list[CaseResult]:
    """One result per (case, backend): a later line wins (a resumed run's retry)."""
    d: dict[tuple[str, str], CaseResult] = {}
    for r in results:
        d.pop(result_key(r), None)
        d[result_key(r)] = r
    return list(d.values())


def _shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    i, n = (int(x) for x in text.split("/"))
    return i, n


def merge_results(paths: list[str | Path]) -> tuple[RunHeader, list[CaseResult]]:
    """Join the shards of one run into one header and result list.

    Every file must be one shard ``i/n`` of the same ``n`` and the same plan, each shard once and
    none missing; otherwise :class:`ResultsError` names what is wrong (a merge that silently
    dropped a shard would judge part of a run as the whole). Files without a shard tag (plain
    runs) merge as they are, their plans united.
    """
    if not paths:
        raise ResultsError("merge: no results files given")
    loaded = [(Path(p), *load_results(p)) for p in paths]
    versions = {h.schema_version for _, h, _ in loaded}
    if len(versions) > 1:
        per = ", ".join(f"{p}: v{h.schema_version}" for p, h, _ in loaded)
        raise ResultsError(f"merge: schema versions differ ({per})")
    shards = [(p, _shard(h.shard)) for p, h, _ in loaded]
    tagged = [(p, s) for p, s in shards if s is not None]
    if tagged:
        if len(tagged) != len(shards):
            raise ResultsError("merge: some files are shards and some are not: "
                               + ", ".join(f"{p} ({'shard ' + h.shard if h.shard else 'whole run'})" for p, h, _ in loaded))
        ns = {s[1] for _, s in tagged}
        if len(ns) > 1:
            raise ResultsError(f"merge: shards of different counts {sorted(ns)}")
        n = ns.pop()
        seen: dict[int, Path] = {}
        for p, (i, _) in tagged:
            if i in seen:
                raise ResultsError(f"merge: shard {i}/{n} given twice ({seen[i]} and {p})")
            seen[i] = p
        missing = [f"{i}/{n}" for i in range(n) if i not in seen]
        if missing:
            raise ResultsError(f"merge: shard(s) {', '.join(missing)} missing; have {len(seen)} of {n}")
    first = loaded[0][1]
    suites: list[str] = []
    backends: list[str] = []
    seeds: list[int] = []
    planned: list[tuple[str, str]] | None = []
    merged: list[CaseResult] = []
    for _, h, rs in loaded:
        suites += [s for s in h.suites if s not in suites]
        backends += [b for b in h.backends if b not in backends]
        seeds += [s for s in h.environment.seeds if s not in seeds]
        if planned is not None and h.planned is not None:
            planned += [tuple(x) for x in h.planned]
        else:
            planned = None
        merged += rs
    env = first.environment.model_copy(update={"seeds": seeds})
    header = first.model_copy(update={
        "suites": suites, "backends": backends, "environment": env, "shard": None,
        "shards": [h.shard for _, h, _ in loaded if h.shard], "planned": planned})
    return header, latest(merged)
