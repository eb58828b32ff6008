"""The pre-merge precision gate: run a tier of suites x backends and decide pass or fail.

A result fails on any of:

- status ``error``, ``nan`` or ``crash`` (``unsupported`` is listed, never fails; a backend named
  by ``--require`` must be available and run at least one case, else exit 3);
- a hard contract (:class:`~gdncheck.report.schema.Contracts`): untouched pool rows changed,
  padded rows against the declared policy, unwritten elements, NaN/Inf where the oracle is
  finite, final state not written where the API says;
- a budget: ``metrics[tensor].field > max`` for the most specific ``[[budget]]`` entry matching
  the result's backend, op, dtype and state dtype (``budgets.toml`` shipped with the package,
  files given with ``--budgets`` merged over it);
- against a baseline results file: a case that passed there and fails now, or a budgeted
  metric that grew by more than ``--regress-factor``.

Exit codes: 0 pass, 1 precision or contract failure, 2 usage or configuration error,
3 environment (no GPU for a GPU run, a required backend unavailable).
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Iterable, Optional

import typer

from gdncheck.report.schema import CaseResult, TensorMetrics

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_ENV = 0, 1, 2, 3

# Tiers: suites run on every push (smoke) and nightly / before merge (full).
TIERS: dict[str, list[str]] = {"smoke": ["smoke"], "full": ["smoke", "models", "edges", "findings"]}

TENSORS = ("o", "state", "intermediate")
# Metric fields a budget may bound (smaller is better for each).
FIELDS = ("in_floors", "in_twins", "rel_l2", "max_abs", "max_rel", "ulp_p50", "ulp_p99", "ulp_max")
# Below these values a metric sits at the rounding floor: a baseline "regression" there is noise.
NOISE = {"in_floors": 1.0, "in_twins": 1.0}
_KEYS = ("backend", "op", "dtype", "state_dtype")
_BUDGET_FIELDS = {*_KEYS, "metric", "max", "why"}


class GateConfigError(ValueError):
    """Bad budgets, baseline or arguments: exit 2. The message names the file and the problem."""


class GateEnvError(RuntimeError):
    """The environment cannot run what was asked (no GPU, required backend missing): exit 3."""


# ---------------------------------------------------------------- budgets

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
        raise GateConfigError(f"budgets file {path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise GateConfigError(f"budgets file {path}: malformed TOML: {e}") from None
    unknown = set(data) - {"budget", "description"}
    if unknown:
        raise GateConfigError(f"budgets file {path}: unknown top-level key(s) {sorted(unknown)}; "
                              "expected [[budget]] tables")
    entries = data.get("budget", [])
    if not isinstance(entries, list):
        raise GateConfigError(f"budgets file {path}: 'budget' must be an array of tables ([[budget]])")
    out = []
    for i, e in enumerate(entries):
        where = f"budgets file {path}: [[budget]] #{i + 1}"
        if not isinstance(e, dict):
            raise GateConfigError(f"{where}: expected a table")
        bad = set(e) - _BUDGET_FIELDS
        if bad:
            raise GateConfigError(f"{where}: unknown key(s) {sorted(bad)}; allowed: {sorted(_BUDGET_FIELDS)}")
        metric = e.get("metric")
        if not isinstance(metric, str) or metric.count(".") != 1:
            raise GateConfigError(f"{where}: 'metric' must be '<tensor>.<field>', e.g. 'o.in_floors'; got {metric!r}")
        t, f = metric.split(".")
        if t not in TENSORS or f not in FIELDS:
            raise GateConfigError(f"{where}: metric {metric!r}: tensor must be one of {list(TENSORS)}, "
                                  f"field one of {list(FIELDS)}")
        mx = e.get("max")
        if isinstance(mx, bool) or not isinstance(mx, (int, float)) or math.isnan(mx) or mx < 0:
            raise GateConfigError(f"{where} ({metric}): 'max' must be a number >= 0 (inf disables); got {mx!r}")
        for k in _KEYS:
            if not isinstance(e.get(k, "*"), str):
                raise GateConfigError(f"{where} ({metric}): '{k}' must be a string pattern; got {e[k]!r}")
        out.append(Budget(metric=metric, max=float(mx), why=str(e.get("why", "")), source=f"{path.name}#{i + 1}",
                          **{k: e.get(k, "*") for k in _KEYS}))
    return out


def load_budgets(overrides: Iterable[str | Path] = (), *, defaults: bool = True) -> Budgets:
    """The shipped defaults, then each override file merged over them (later wins ties)."""
    files = ([default_budgets_path()] if defaults else []) + [Path(p) for p in overrides]
    entries: list[Budget] = []
    for p in files:
        if not p.exists():
            raise GateConfigError(f"budgets file {p}: not found")
        entries += _parse_budgets(p)
    return Budgets(entries, [str(p) for p in files])


# ---------------------------------------------------------------- judging

@dataclass
class Finding:
    """One reason a result fails (or, in ``improvements``, got better)."""

    kind: str  # status | contract | budget | regression | now-fails | now-passes | improved
    check: str  # e.g. "o.in_floors", "contract:untouched_rows", "status:crash"
    backend: str
    case_id: str
    case: str  # case name or id
    op: str
    dtype: str
    value: float | None = None
    limit: float | None = None
    severity: float = math.inf  # value / limit; inf for status and contracts
    detail: str = ""
    repro: str = ""


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.4g}"


def _finding(r: CaseResult, kind: str, check: str, **kw) -> Finding:
    return Finding(kind=kind, check=check, backend=r.backend, case_id=r.case_id, case=r.case.name or r.case_id,
                   op=r.case.op, dtype=r.case.dtype, repro=r.repro or r.case.repro(), **kw)


def _metric(r: CaseResult, tensor: str, fld: str) -> float | None:
    m: TensorMetrics | None = r.metrics.get(tensor)
    if m is None:
        return None
    return getattr(m, fld)


def judge(r: CaseResult, budgets: Budgets, *, as_backend: str | None = None) -> list[Finding]:
    """Why ``r`` fails the gate (empty = pass). ``unsupported`` never fails here.
    ``as_backend``: look budgets up under this name (a planted fault judged as the kernel it fakes)."""
    if r.status == "unsupported":
        return []
    if r.status != "ok":
        why = r.reason or ""
        if not why and r.contracts is not None and r.contracts.nan_where_finite:
            why = f"{r.contracts.nan_where_finite} NaN/Inf where the oracle is finite"
        return [_finding(r, "status", f"status:{r.status}", detail=why[:300])]
    out: list[Finding] = []
    c = r.contracts
    if c is None:
        return [_finding(r, "contract", "contract:missing", detail="result carries no contracts")]
    extra = "; ".join(c.details[:3]) if getattr(c, "details", None) else ""
    if c.untouched_changed:
        out.append(_finding(r, "contract", "contract:untouched_rows", value=len(c.untouched_changed),
                            detail=f"rows {c.untouched_changed[:8]} changed of {c.untouched_rows} untouched"))
    if c.padded_ok is False:
        out.append(_finding(r, "contract", "contract:padding", detail="; ".join(c.padded_details[:3])))
    if c.unwritten:
        out.append(_finding(r, "contract", "contract:unwritten", value=c.unwritten,
                            detail=f"{c.unwritten} elements left poisoned"))
    if c.nan_where_finite:
        out.append(_finding(r, "contract", "contract:nan_inf", value=c.nan_where_finite,
                            detail=f"{c.nan_where_finite} NaN/Inf where the oracle is finite"))
    if c.state_written is False:
        out.append(_finding(r, "contract", "contract:state_written", detail=extra or "state not written"))
    for metric, b in budgets.for_result(r, as_backend).items():
        v = _metric(r, b.tensor, b.field)
        if v is None or math.isinf(b.max):
            continue
        if math.isnan(v) or v > b.max:
            sev = math.inf if math.isnan(v) or b.max == 0 else v / b.max
            out.append(_finding(r, "budget", metric, value=v, limit=b.max, severity=sev,
                                detail=f"budget {b.source}" + (f": {b.why}" if b.why else "")))
    return out


def compare(cur: list[CaseResult], base: list[CaseResult], budgets: Budgets,
            factor: float) -> tuple[list[Finding], list[Finding]]:
    """(regressions, improvements) of ``cur`` against a baseline run, per (case, backend).

    Regression: passed in the baseline and fails now, or a budgeted metric grew by more than
    ``factor`` (and stands above its noise level: 1 floor / 1 twin for ``in_*`` metrics)."""
    idx = {(b.case_id, b.backend): b for b in base}
    regs: list[Finding] = []
    imps: list[Finding] = []
    for r in cur:
        b = idx.get((r.case_id, r.backend))
        if b is None or r.status == "unsupported" or b.status == "unsupported":
            continue
        was_ok, is_ok = not judge(b, budgets), not judge(r, budgets)
        if was_ok and not is_ok:
            regs.append(_finding(r, "now-fails", "passed in baseline", detail=f"baseline status {b.status}"))
        elif is_ok and not was_ok:
            imps.append(_finding(r, "now-passes", "failed in baseline", severity=0.0))
        if r.status != "ok" or b.status != "ok":
            continue
        for metric, bud in budgets.for_result(r).items():
            v, w = _metric(r, bud.tensor, bud.field), _metric(b, bud.tensor, bud.field)
            if v is None or w is None or math.isnan(v) or math.isnan(w):
                continue
            noise = NOISE.get(bud.field, 0.0)
            if v > factor * w and v > noise:
                regs.append(_finding(r, "regression", metric, value=v, limit=w * factor,
                                     severity=v / w if w > 0 else math.inf,
                                     detail=f"{_fmt(w)} -> {_fmt(v)} (x{_fmt(v / w) if w > 0 else 'inf'})"))
            elif v * factor < w and w > noise:
                imps.append(_finding(r, "improved", metric, value=v, limit=w, severity=w / max(v, 1e-300),
                                     detail=f"{_fmt(w)} -> {_fmt(v)}"))
    return regs, imps


@dataclass
class Verdict:
    exit_code: int
    failures: list[Finding]
    regressions: list[Finding] = field(default_factory=list)
    improvements: list[Finding] = field(default_factory=list)
    unsupported: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_OK

    def to_json(self) -> dict:
        return {"verdict": "pass" if self.passed else "fail", "exit_code": self.exit_code, "counts": self.counts,
                "messages": self.messages, "failures": [asdict(f) for f in self.failures],
                "regressions": [asdict(f) for f in self.regressions],
                "improvements": [asdict(f) for f in self.improvements], "unsupported": self.unsupported}


def _dedupe(results: list[CaseResult]) -> list[CaseResult]:
    d: dict[tuple[str, str], CaseResult] = {}
    for r in results:
        d.pop((r.case_id, r.backend), None)
        d[(r.case_id, r.backend)] = r
    return list(d.values())


def decide(results: list[CaseResult], budgets: Budgets, *, require: Iterable[str] = (),
           baseline: list[CaseResult] | None = None, regress_factor: float = 1.5) -> Verdict:
    """The gate's verdict over one run's results (a later line for the same pair wins)."""
    results = _dedupe(results)
    failures: list[Finding] = []
    unsupported = []
    counts = {"results": len(results), "pass": 0, "fail": 0, "unsupported": 0}
    for r in results:
        if r.status == "unsupported":
            counts["unsupported"] += 1
            unsupported.append({"backend": r.backend, "case": r.case.name or r.case_id, "case_id": r.case_id,
                                "reason": r.reason or ""})
            continue
        f = judge(r, budgets)
        counts["fail" if f else "pass"] += 1
        failures += f
    failures.sort(key=lambda f: (-f.severity, f.backend, f.case, f.check))
    messages = []
    code = EXIT_FAIL if failures else EXIT_OK
    for name in require:
        ran = [r for r in results if r.backend == name and r.status != "unsupported"]
        if not ran:
            why = {r.reason for r in results if r.backend == name}
            messages.append(f"required backend {name!r} ran no case" + (f": {sorted(why)[0]}" if why else ""))
            code = EXIT_ENV
    regs: list[Finding] = []
    imps: list[Finding] = []
    if baseline is not None:
        regs, imps = compare(results, baseline, budgets, regress_factor)
        regs.sort(key=lambda f: -f.severity)
        imps.sort(key=lambda f: -f.severity)
        counts["regressions"], counts["improvements"] = len(regs), len(imps)
        if regs and code == EXIT_OK:
            code = EXIT_FAIL
    return Verdict(code, failures, regs, imps, unsupported, counts, messages)


# ---------------------------------------------------------------- output

def _table(title: str, rows: list[Finding], limit: int, style: str):
    from rich.table import Table

    t = Table(title=title, title_style=style, show_lines=False)
    for col, kw in (("#", {"justify": "right"}), ("backend", {}), ("case", {"overflow": "fold"}), ("op/dtype", {}),
                    ("check", {}), ("value", {"justify": "right"}), ("budget", {"justify": "right"}),
                    ("x", {"justify": "right"}), ("detail", {"overflow": "fold"})):
        t.add_column(col, **kw)
    for i, f in enumerate(rows[:limit], 1):
        t.add_row(str(i), f.backend, f.case, f"{f.op}/{f.dtype}", f.check, _fmt(f.value), _fmt(f.limit),
                  _fmt(f.severity) if f.kind in ("budget", "regression") else "", f.detail[:160])
    return t


def print_verdict(v: Verdict, console=None, *, limit: int = 50) -> None:
    """Failures worst first (rich table), each with its repro line; regressions, improvements,
    unsupported pairs; then the verdict."""
    from rich.console import Console

    con = console or Console(stderr=True)
    if v.failures:
        con.print(_table(f"failures ({len(v.failures)}, worst first)", v.failures, limit, "bold red"))
    if v.regressions:
        con.print(_table(f"regressions against the baseline ({len(v.regressions)})", v.regressions, limit, "bold red"))
    for i, f in enumerate((v.failures + v.regressions)[:limit], 1):
        con.print(f"[dim]repro {i}:[/dim] {f.repro}", soft_wrap=True, highlight=False, markup=False)
    if v.improvements:
        con.print(_table(f"improved against the baseline ({len(v.improvements)})", v.improvements, limit, "bold green"))
    if v.unsupported:
        per: dict[str, int] = {}
        for u in v.unsupported:
            per[u["backend"]] = per.get(u["backend"], 0) + 1
        con.print("unsupported (not a failure): " + ", ".join(f"{b} {n}" for b, n in sorted(per.items())))
    for m in v.messages:
        con.print(f"[red]{m}[/red]")
    c = v.counts
    word = "[bold green]PASS[/bold green]" if v.passed else "[bold red]FAIL[/bold red]"
    con.print(f"gate: {word} (exit {v.exit_code}): {c.get('pass', 0)} pass, {c.get('fail', 0)} fail, "
              f"{c.get('unsupported', 0)} unsupported" + (f", {len(v.regressions)} regressions, "
                                                           f"{len(v.improvements)} improvements"
                                                           if "regressions" in c else ""))


def markdown(v: Verdict, *, title: str = "gdncheck precision gate", limit: int = 30) -> str:
    """The verdict as Markdown (for ``$GITHUB_STEP_SUMMARY`` and gate.md)."""
    c = v.counts
    lines = [f"## {title}: {'PASS' if v.passed else 'FAIL'} (exit {v.exit_code})", "",
             f"{c.get('pass', 0)} pass, {c.get('fail', 0)} fail, {c.get('unsupported', 0)} unsupported"
             + (f"; {len(v.regressions)} regressions, {len(v.improvements)} improvements vs baseline"
                if "regressions" in c else ""), ""]
    lines += [f"- {m}" for m in v.messages]

    def tab(head: str, rows: list[Finding]) -> None:
        lines.extend([f"### {head}", "", "| # | backend | case | op/dtype | check | value | budget | detail |",
                      "|---|---|---|---|---|---|---|---|"])
        for i, f in enumerate(rows[:limit], 1):
            det = f.detail.replace("|", "\\|")[:120]
            lines.append(f"| {i} | {f.backend} | {f.case} | {f.op}/{f.dtype} | {f.check} | {_fmt(f.value)} "
                         f"| {_fmt(f.limit)} | {det} |")
        if len(rows) > limit:
            lines.append(f"\n... and {len(rows) - limit} more (gate.json)")
        lines.append("")

    if v.failures:
        tab("Failures (worst first)", v.failures)
        lines += ["<details><summary>repro lines</summary>", "", "```"]
        lines += [f.repro for f in v.failures[:limit]] + ["```", "</details>", ""]
    if v.regressions:
        tab("Regressions vs baseline", v.regressions)
    if v.improvements:
        tab("Improved vs baseline", v.improvements)
    if v.unsupported:
        per: dict[str, int] = {}
        for u in v.unsupported:
            per[u["backend"]] = per.get(u["backend"], 0) + 1
        lines.append("Unsupported (not failures): " + ", ".join(f"{b}: {n}" for b, n in sorted(per.items())))
    return "\n".join(lines) + "\n"


def write_verdict(v: Verdict, out: Path, extra: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate.json").write_text(json.dumps({**(extra or {}), **v.to_json()}, indent=1, default=str) + "\n")
    (out / "gate.md").write_text(markdown(v))


# ---------------------------------------------------------------- results files

def load_results(path: Path, what: str) -> list[CaseResult]:
    """Results of a JSONL file; a missing file, a malformed line or another schema version is a
    :class:`GateConfigError` naming ``what`` (e.g. "baseline") and the file."""
    from gdncheck.report.io import ResultsError
    from gdncheck.report.io import load_results as _load

    if not Path(path).exists():
        raise GateConfigError(f"{what} {path}: not found")
    try:
        return _load(path)[1]
    except ResultsError as e:
        raise GateConfigError(f"{what}: {e}") from None


def merge_shards(paths: list[Path], out: Path) -> Path:
    """Join shard results into ``out`` (``gdncheck.report.io.merge_results``)."""
    from gdncheck.report.io import ResultsError, merge_results, write_results

    try:
        header, results = merge_results(paths)
    except ResultsError as e:
        raise GateConfigError(f"shards: {e}") from None
    write_results(out, header, results)
    return out


# ---------------------------------------------------------------- GPUs

def visible_gpus() -> list[str]:
    """GPU ids this process may use, without initialising CUDA: ``CUDA_VISIBLE_DEVICES`` when set,
    else one per line of ``nvidia-smi -L``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [x.strip() for x in env.split(",") if x.strip() and x.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]


def gpu_for_worker(worker_id: str | None, gpus: list[str]) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` value for pytest-xdist worker ``gwK``: GPU ``K % n`` (None: leave as is)."""
    if not worker_id or not worker_id.startswith("gw") or not gpus:
        return None
    try:
        k = int(worker_id[2:])
    except ValueError:
        return None
    return gpus[k % len(gpus)]


def _fan_out(argv: list[str], n: int, gpus: list[str], out: Path) -> list[Path]:
    """Run ``gdncheck gate --shard i/n`` once per GPU (``CUDA_VISIBLE_DEVICES`` = that GPU), in
    parallel; returns the shard results files. Raises on a child's config/env exit."""
    procs = []
    for i in range(n):
        sub = out / f"shard-{i}"
        sub.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "gdncheck", "gate", *argv, "--shard", f"{i}/{n}", "--gpus", "1",
               "--out", str(sub), "--no-judge", "--no-progress"]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}
        log = (sub / "gate.log").open("w")
        procs.append((i, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log, sub))
    codes = {}
    for i, p, log, sub in procs:
        codes[i] = p.wait()
        log.close()
    for want, exc in ((EXIT_USAGE, GateConfigError), (EXIT_ENV, GateEnvError)):
        bad = [i for i, c in codes.items() if c == want]
        if bad:
            tail = (out / f"shard-{bad[0]}" / "gate.log").read_text()[-800:]
            raise exc(f"shard {bad[0]}/{n} exited {want}:\n{tail}")
    dead = [i for i, c in codes.items() if c not in (EXIT_OK, EXIT_FAIL)]
    if dead:
        raise GateEnvError(f"shard process(es) {dead} died (exit {[codes[i] for i in dead]}); logs in {out}/shard-*/gate.log")
    return [out / f"shard-{i}" / "results.jsonl" for i in range(n)]


# ---------------------------------------------------------------- planted faults: the kill table

@dataclass
class KillRow:
    fault: str
    killed: bool
    cases: int
    failed: int
    by: list[str]
    worst: Finding | None


def _reseed(case, s: int):
    return case.model_copy(update={"seed": case.seed + 1009 * s}) if s else case


def judge_fault(backend, cases, budgets: Budgets, *, as_backend: str, device: str = "cpu",
                stop_at_kill: bool = False) -> tuple[int, list[Finding]]:
    """Run ``backend`` on ``cases`` (no twin) and judge each as ``as_backend``: (cases failed, findings).
    ``stop_at_kill``: stop at the first failing case (enough to show a fault is caught)."""
    from gdncheck.run import run_case

    failed, found = 0, []
    for c in cases:
        f = judge(run_case(backend, c, device=device, twin=None), budgets, as_backend=as_backend)
        for x in f:
            x.backend = backend.name
        failed += bool(f)
        found += f
        if f and stop_at_kill:
            break
    found.sort(key=lambda f: -f.severity)
    return failed, found


def reseeded(cases, seed_index: int) -> list:
    """``cases`` with seeds shifted for reseeding ``seed_index`` (0 = unchanged)."""
    return [_reseed(c, seed_index) for c in cases]


def kill_table(budgets: Budgets, *, seeds: int = 20, faults: Iterable[str] | None = None,
               device: str = "cpu", clean: bool = True) -> tuple[list[KillRow], KillRow | None, list[Finding]]:
    """Every planted fault must fail the gate on ``fault_cases()``; the clean twin must pass them on
    ``seeds`` reseedings. No precision twin is given: a twin compared with itself is 1 twin by
    construction, so faults are judged on ``in_floors`` budgets and contracts only, under the
    clean twin's backend name (the kernel they impersonate).

    Returns (one row per fault, the clean twin's row, the clean twin's false alarms)."""
    from gdncheck.backends import faults as F

    cases = F.fault_cases()
    clean_be = F.clean_twin()
    names = list(faults) if faults is not None else sorted(F.FAULTS)
    unknown = [n for n in names if n not in F.FAULTS]
    if unknown:
        raise GateConfigError(f"unknown fault(s) {unknown}; known: {sorted(F.FAULTS)}")
    rows = []
    for name in names:
        failed, found = judge_fault(F.FAULTS[name](), cases, budgets, as_backend=clean_be.name, device=device)
        rows.append(KillRow(name, bool(found), len(cases), failed, sorted({f.check for f in found}),
                            found[0] if found else None))
    twin_row, alarms = None, []
    if clean:
        failed = 0
        for s in range(seeds):
            n, f = judge_fault(clean_be, reseeded(cases, s), budgets, as_backend=clean_be.name, device=device)
            failed += n
            alarms += f
        alarms.sort(key=lambda f: -f.severity)
        twin_row = KillRow(f"clean twin ({clean_be.name}) x {seeds} seeds", bool(alarms), seeds * len(cases),
                           failed, sorted({f.check for f in alarms}), alarms[0] if alarms else None)
    return rows, twin_row, alarms


def print_kill_table(rows: list[KillRow], twin: KillRow | None, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console(width=None if sys.stdout.isatty() else 160)
    t = Table(title="planted faults: killed by the gate?")
    for col in ("fault", "killed", "cases failed", "by", "worst case", "worst value / budget"):
        t.add_column(col, overflow="fold")
    for r in rows + ([twin] if twin else []):
        is_twin = r is twin
        ok = (not r.killed) if is_twin else r.killed
        mark = ("[green]no (pass)[/green]" if ok else "[red]FALSE ALARM[/red]") if is_twin else \
            ("[green]yes[/green]" if ok else "[red]NO[/red]")
        w = r.worst
        t.add_row(r.fault, mark, f"{r.failed}/{r.cases}", ", ".join(r.by) or "-", (w.case if w else "-"),
                  (f"{_fmt(w.value)} / {_fmt(w.limit)}" if w and w.kind == "budget" else (w.detail[:60] if w else "-")))
    con.print(t)


# ---------------------------------------------------------------- command line

def register(app) -> None:
    @app.command("gate")
    def gate_cmd(
        tier: Annotated[str, typer.Option(help=f"suite tier: {', '.join(f'{k}={v}' for k, v in TIERS.items())}")] = "smoke",
        suite: Annotated[Optional[list[str]], typer.Option("--suite", "-s", help="suites instead of the tier (repeatable)")] = None,
        backend: Annotated[Optional[list[str]], typer.Option("--backend", "-b", help="backends (repeatable); default per device")] = None,
        budgets: Annotated[Optional[list[Path]], typer.Option("--budgets", help="TOML merged over the shipped budgets (repeatable)")] = None,
        baseline: Annotated[Optional[Path], typer.Option(help="results.jsonl of an earlier run to compare with")] = None,
        regress_factor: Annotated[float, typer.Option(help="fail when a budgeted metric grows by more than this")] = 1.5,
        shard: Annotated[Optional[str], typer.Option(help="run shard i/n of the tier")] = None,
        gpus: Annotated[str, typer.Option(help="'auto' or N: one process per GPU, each a shard, then merge")] = "auto",
        jobs: Annotated[int, typer.Option("--jobs", "-j", help="worker processes per GPU (kernels compile in parallel)")] = 1,
        out: Annotated[Path, typer.Option(help="directory: results.jsonl, gate.json, gate.md")] = Path("runs/gate"),
        device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default cuda when present")] = None,
        require: Annotated[Optional[list[str]], typer.Option("--require", help="backend that must be available and run (repeatable)")] = None,
        results: Annotated[Optional[Path], typer.Option("--results", help="judge this results file (e.g. merged shards); run nothing")] = None,
        kill_table_: Annotated[bool, typer.Option("--kill-table", help="run the planted faults and the clean twin instead")] = False,
        seeds: Annotated[int, typer.Option(help="--kill-table: seeds for the clean twin")] = 20,
        resume: Annotated[bool, typer.Option("--resume/--fresh", help="keep results already in --out")] = False,
        judge_: Annotated[bool, typer.Option("--judge/--no-judge", hidden=True)] = True,
        progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    ) -> None:
        """Pre-merge precision gate: run a tier, judge budgets, contracts and a baseline. Exit 0/1/2/3."""
        from rich.console import Console
        from rich.markup import escape

        con = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
        try:
            code = _gate(tier, suite, backend, budgets or [], baseline, regress_factor, shard, gpus, out, device,
                         require or [], results, kill_table_, seeds, resume, judge_, progress, con, jobs)
        except GateConfigError as e:
            con.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
            code = EXIT_USAGE
        except GateEnvError as e:
            con.print(f"[red]environment:[/red] {escape(str(e))}", highlight=False)
            code = EXIT_ENV
        raise typer.Exit(code)


def _check_backends(specs: list[str], require: list[str], device: str) -> None:
    from gdncheck.backends import BackendNotFound, load_backend

    for s in dict.fromkeys(specs + require):
        try:
            b = load_backend(s)
        except BackendNotFound as e:
            raise GateConfigError(str(e)) from None
        if s in require:
            why = b.available()
            if why:
                raise GateEnvError(f"required backend {s!r} is unavailable: {why}")
            if b.caps.device.startswith("cuda") and not device.startswith("cuda"):
                raise GateEnvError(f"required backend {s!r} needs a GPU, the gate runs on {device}")


def _gate(tier, suite, backend, budget_files, baseline, regress_factor, shard, gpus, out, device, require,
          results, kill, seeds, resume, judge_, progress, con, jobs: int = 1) -> int:
    from gdncheck.cli import parse_shard
    from gdncheck.run import default_device

    budgets = load_budgets(budget_files)  # config errors first, before any work
    if regress_factor <= 1.0:
        raise GateConfigError(f"--regress-factor must be > 1, got {regress_factor}")
    if jobs < 1:
        raise GateConfigError(f"--jobs must be >= 1, got {jobs}")
    out = Path(out)
    device = device or default_device()
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise GateEnvError(f"--device {device} but no CUDA device is visible")

    if kill:
        rows, twin, alarms = kill_table(budgets, seeds=seeds, device=device)
        print_kill_table(rows, twin)
        if alarms:
            print_verdict(Verdict(EXIT_FAIL, alarms, counts={}), con, limit=10)
        missed = [r.fault for r in rows if not r.killed]
        out.mkdir(parents=True, exist_ok=True)
        (out / "kill_table.json").write_text(json.dumps(
            {"faults": [{**asdict(r), "worst": asdict(r.worst) if r.worst else None} for r in rows],
             "clean_twin": {**asdict(twin), "worst": asdict(twin.worst) if twin.worst else None} if twin else None,
             "missed": missed, "false_alarms": len(alarms)}, indent=1, default=str) + "\n")
        return EXIT_FAIL if missed or alarms else EXIT_OK

    baseline_results = load_results(baseline, "baseline") if baseline is not None else None
    sh = parse_shard(shard)
    if suite:
        suites = list(suite)
    elif tier in TIERS:
        suites = TIERS[tier]
    else:
        raise GateConfigError(f"--tier: unknown tier {tier!r}; known: {', '.join(TIERS)}")

    if results is not None:
        res = load_results(results, "results")
        res_path = results
    else:
        from gdncheck.backends import default_backends
        from gdncheck.cases import SuiteError
        from gdncheck.run import plan, run

        specs = list(backend) if backend else default_backends(device.startswith("cuda"))
        _check_backends(specs, require, device)
        try:
            from gdncheck.backends import load_backend
            planned = {(c.id, b.name) for b, c in plan(suites, [load_backend(s) for s in specs], sh)}
        except SuiteError as e:
            raise GateConfigError(str(e)) from None
        n = _gpu_count(gpus, device) if sh is None else 1
        res_path = out / "results.jsonl"
        t0 = time.perf_counter()
        if n > 1:
            gpu_ids = visible_gpus()
            argv = sum((["--suite", s] for s in suites), []) + sum((["--backend", b] for b in specs), [])
            argv += sum((["--budgets", str(p)] for p in budget_files), []) + ["--device", "cuda"]
            argv += ["--resume"] if resume else []
            argv += ["--jobs", str(jobs)]
            con.print(f"gate: {n} shards on GPUs {gpu_ids[:n]}")
            merge_shards(_fan_out(argv, n, gpu_ids, out), res_path)
        else:
            run(suites, specs, res_path, device=device, resume=resume, shard=sh, progress=progress, jobs=jobs)
        wall = time.perf_counter() - t0
        con.print(f"gate: ran {len(planned)} pairs in {wall:.1f} s ({jobs} job{'s' * (jobs > 1)}) -> {res_path}")
        res = [r for r in load_results(res_path, "results") if (r.case_id, r.backend) in planned]
    if not judge_:
        return EXIT_OK
    v = decide(res, budgets, require=require, baseline=baseline_results, regress_factor=regress_factor)
    print_verdict(v, con)
    write_verdict(v, out, {"suites": suites, "results": str(res_path), "budgets": budgets.files,
                           "baseline": str(baseline) if baseline else None, "shard": shard,
                           "jobs": jobs, "wall_s": None if results is not None else round(wall, 1)})
    con.print(f"verdict: {out / 'gate.json'}, {out / 'gate.md'}")
    return v.exit_code


def _gpu_count(gpus: str, device: str) -> int:
    if device != "cuda":
        return 1  # cpu, or a pinned cuda:N
    if gpus == "auto":
        return max(1, len(visible_gpus()))
    try:
        n = int(gpus)
    except ValueError:
        raise GateConfigError(f"--gpus: expected 'auto' or a number, got {gpus!r}") from None
    if n < 1:
        raise GateConfigError(f"--gpus: need >= 1, got {n}")
    have = len(visible_gpus())
    if n > have:
        raise GateEnvError(f"--gpus {n} but {have} GPU(s) visible")
    return n
