"""``gdncheck run``: suites x backends -> one :class:`CaseResult` per pair, in a run directory.

Each run gets a directory of its own (default ``runs/<run id>``, with ``runs/latest`` pointing at
it) holding ``results.jsonl``, streamed and flushed as each result exists, so a killed run loses at
most the cases in flight. The header records the plan (every (case, backend) pair) and a
:class:`~gdncheck.data.results.Fingerprint`; a run resumes only when asked and only into a
directory whose fingerprint matches (same gdncheck, packages, backend sources, budgets and plan).
A lock keeps two runs out of one directory. The verdict is the judge's (:mod:`gdncheck.judge`).
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shlex
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gdncheck.backends import Backend, load_backend
from gdncheck.budgets import Budgets
from gdncheck.data.case import Case
from gdncheck.data.errors import EnvironmentProblem, Exit, GdncheckError, UsageError
from gdncheck.data.io import load_results
from gdncheck.data.results import CaseResult, Fingerprint, RunHeader
from gdncheck.execute import (Job, Lane, backend_device, case_bytes, closing, default_device, environment, is_oom,
                              memory_budget, run_case, run_units, start_lanes, too_large)
from gdncheck.shard import schedule, unit_lock
from gdncheck.progress import Progress
from gdncheck.suites import load_suite

RESULTS = "results.jsonl"
# Files a run directory holds besides its results; removed when a run starts there, so no report
# of an older run is ever left beside new results.
GENERATED = ("report.md", "report.html", "summary.json", "junit.xml", "verdict.json", "gate.json", "gate.md")
SEED_STRIDE = 1009


class Interrupted(GdncheckError):
    """Ctrl-C: results so far are kept; the message says how to resume."""

    code = Exit.INTERRUPTED


def reseed(case: Case, s: int) -> Case:
    """``case`` with its seed moved for seed index ``s`` (0 = unchanged): reproducible reseeding."""
    return case.model_copy(update={"seed": case.seed + SEED_STRIDE * s}) if s else case


def load_cases(suites: list[str], seeds: int = 1) -> list[Case]:
    """The cases of ``suites`` (deduplicated by id), each under ``seeds`` seeds."""
    cases: list[Case] = []
    seen: set[str] = set()
    for s in suites:
        for c0 in load_suite(s):
            for i in range(seeds):
                c = reseed(c0, i)
                if c.id not in seen:
                    seen.add(c.id)
                    cases.append(c)
    return cases


def plan(suites: list[str], backends: list[Backend], shard: tuple[int, int] | None = None,
         seeds: int = 1) -> list[tuple[Backend, Case]]:
    """(backend, case) pairs in run order: per backend, grouped by compile key. ``shard = (i, n)``
    keeps shard i of n: whole compile units, balanced by the cost model (:mod:`gdncheck.shard`)."""
    from gdncheck.shard import select  # noqa: F811

    cases = load_cases(suites, seeds)
    pairs = []
    for b in backends:
        pairs += [(b, c) for c in sorted(cases, key=lambda c: repr(b.compile_key(c)))]
    return select(pairs, shard) if shard is not None else pairs


def source_hash(backend: Backend, spec: str | None = None) -> str:
    """sha256[:16] of the source files behind a backend: the module defining its class and, for a
    ``module:factory`` spec, the factory's module (a plugin edited since is another backend)."""
    import importlib.util

    h = hashlib.sha256()
    files = []
    try:
        files.append(inspect.getsourcefile(type(backend)))
    except TypeError:
        pass
    if spec and ":" in spec:
        try:
            found = importlib.util.find_spec(spec.partition(":")[0])
            files.append(found.origin if found else None)
        except (ImportError, ValueError):
            pass
    for f in files:
        try:
            h.update(Path(f).read_bytes() if f else b"")
        except OSError:
            pass
    h.update(type(backend).__qualname__.encode())
    return h.hexdigest()[:16]


def fingerprint(backends: list[Backend], pairs: list[tuple[Backend, Case]], budgets: Budgets | None,
                device: str, specs: list[str] | None = None, env=None) -> Fingerprint:
    """What the run's results depend on; ``env``: the run's :func:`~gdncheck.execute.environment`
    (asked for here when not given: it runs git and nvidia-smi)."""
    env = env or environment()
    planned = sorted((c.id, b.name) for b, c in pairs)
    return Fingerprint(
        gdncheck=env.gdncheck, git_rev=env.git_rev,
        packages={"torch": env.torch, "triton": env.triton, "flashinfer": env.flashinfer, "fla": env.fla,
                  "sglang": env.sglang, "vllm": env.vllm},
        backends={b.name: source_hash(b, s) for b, s in zip(backends, specs or [None] * len(backends))},
        budgets=budgets.digest if budgets else None,
        plan=hashlib.sha256(json.dumps(planned).encode()).hexdigest()[:16], device=device)


# ---------------------------------------------------------------- run directories

def new_run_id() -> str:
    """Sorts by start time (to the millisecond), then a random tail against clashes."""
    t = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}-" + uuid.uuid4().hex[:4]


@dataclass
class RunDir:
    """A run's directory, locked for the run's lifetime."""

    path: Path
    run_id: str
    resumed: RunHeader | None = None
    done: set = field(default_factory=set)
    _lock: object = None

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def open_run_dir(out: Path | None, *, resume: bool = False, overwrite: bool = False, root: Path = Path("runs"),
                 fp: Fingerprint | None = None) -> RunDir:
    """Prepare (or reopen, with ``resume``) a run directory; every problem is one :class:`UsageError`
    raised before any work starts."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    run_id = new_run_id()
    if out is None:
        if resume:
            raise UsageError("--resume needs --out DIR (the run directory to continue)")
        out = root / run_id
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = (out / ".lock").open("a")
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise UsageError(f"--out {out}: another gdncheck run is using this directory") from None
    rd = RunDir(out, run_id, _lock=lock)
    try:
        res = out / RESULTS
        if res.exists() and res.stat().st_size:
            header, results = load_results(res)
            if resume:
                if header.fingerprint is None or fp is None:
                    raise UsageError(f"--resume: {res} records no fingerprint; it cannot be checked, start afresh")
                why = header.fingerprint.differs(fp)
                if why:
                    raise UsageError(f"--resume refused: {res} was made by another setup ({why}); "
                                     "start a fresh run (--overwrite or another --out)")
                rd.run_id, rd.resumed = header.run_id, header
                rd.done = {(r.case_id, r.backend) for r in results}
            elif overwrite:
                res.unlink()
            else:
                raise UsageError(f"--out {out}: already holds run {header.run_id} ({len(results)} results); "
                                 "give --resume to continue it, --overwrite to replace it, or another --out")
        elif resume:
            raise UsageError(f"--resume: {out} holds no results to continue")
        for name in GENERATED:
            (out / name).unlink(missing_ok=True)
    except BaseException:
        rd.close()
        raise
    if out.parent == root:
        latest = root / "latest"
        try:
            if latest.is_symlink() or not latest.exists():
                tmp = root / f".latest-{os.getpid()}"
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(out.name)
                tmp.replace(latest)
        except OSError:
            pass  # a filesystem without links: the run id is printed anyway
    return rd


def _repair_tail(path: Path) -> None:
    """Drop a torn last line left by a killed run, so appends start on a fresh line."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def resume_command(out: Path) -> str:
    """The command line that continues this run."""
    args = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite", "--fresh")]
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    return shlex.join(["gdncheck", *args, "--resume"])


# ---------------------------------------------------------------- the run

@dataclass
class RunOutcome:
    dir: RunDir
    header: RunHeader
    planned: int
    ran: int
    wall_s: float
    phases: dict = field(default_factory=dict)


def _declared_unsupported(b: Backend, c: Case, device: str) -> str | None:
    """Why ``b``'s declared capabilities or the case's size rule the pair out, else None."""
    try:
        return b.supports(c) or too_large(c, backend_device(b, device))
    except Exception:  # noqa: BLE001 - a plugin's supports() that raises: its worker reports it
        return None


def run(suites: list[str], backend_specs: list[str], out: Path | None = None, *, device: str | None = None,
        isolate: bool | None = None, resume: bool = False, overwrite: bool = False,
        shard: tuple[int, int] | None = None, twin_spec: str | None = "auto", progress: bool = True,
        on_result=None, jobs: int = 1, seeds: int = 1, budgets: Budgets | None = None,
        run_root: Path = Path("runs"), sanitize: str | None = None) -> RunOutcome:
    """Run ``suites`` x ``backend_specs`` into a run directory (:func:`open_run_dir`).

    ``jobs > 1`` runs that many worker processes side by side on ``device`` (implies isolation):
    each takes whole compile-key units (:func:`gdncheck.execute.schedule`), so kernels compile in
    parallel and each once; cases start within a device-memory budget, and one that runs out of
    memory beside the others is rerun alone at the end. ``seeds > 1`` runs every case under that
    many seeds (``seed + 1009 i``). ``sanitize`` (memcheck, initcheck, racecheck, synccheck) runs
    each pair in its own process under compute-sanitizer (:mod:`gdncheck.sanitize`), ``jobs`` at a
    time. Raises :class:`Interrupted` on Ctrl-C (results kept).
    """
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    device = device or default_device()
    if sanitize is not None:
        from gdncheck.sanitize import require
        require(sanitize)  # a bad tool name (exit 2) or a missing tool (exit 3) before any work
        isolate = True
    isolate = (device.startswith("cuda") or jobs > 1) if isolate is None else isolate
    if jobs > 1 and not isolate:
        raise UsageError("--jobs > 1 runs worker processes: it cannot be combined with --no-isolate")
    backends = [load_backend(s) for s in backend_specs]
    pairs = plan(suites, backends, shard, seeds)
    env = environment(c.seed for _, c in pairs)
    fp = fingerprint(backends, pairs, budgets, device, backend_specs, env)
    rd = open_run_dir(out, resume=resume, overwrite=overwrite, root=run_root, fp=fp)
    try:
        return _run(rd, suites, backends, backend_specs, pairs, fp, device=device, isolate=isolate, shard=shard,
                    twin_spec=twin_spec, progress=progress, on_result=on_result, jobs=jobs, sanitize=sanitize,
                    env=env)
    finally:
        rd.close()


def _run(rd: RunDir, suites, backends, backend_specs, pairs, fp, *, device, isolate, shard, twin_spec, progress,
         on_result, jobs, sanitize=None, env=None) -> RunOutcome:
    t_start = time.perf_counter()
    res_path = rd.results
    _repair_tail(res_path)
    todo = [(b, c) for b, c in pairs if (c.id, b.name) not in rd.done]
    specs = dict(zip([b.name for b in backends], backend_specs))
    header = rd.resumed or RunHeader(
        run_id=rd.run_id, suites=suites, backends=[b.name for b in backends],
        environment=env or environment(c.seed for _, c in pairs), shard=f"{shard[0]}/{shard[1]}" if shard else None,
        jobs=jobs, planned=[(c.id, b.name) for b, c in pairs], fingerprint=fp)
    lock = threading.Lock()

    def twin_for(b: Backend) -> str | None:
        return b.twin if twin_spec == "auto" else twin_spec

    def base_of(b: Backend, c: Case) -> dict:
        return dict(case_id=c.id, case=c, backend=b.name, backend_version=b.version(), device=device,
                    repro=c.repro(specs[b.name]))

    settled, live = [], []
    for b, c in todo:  # declared limits need no worker (nor a share of the memory budget)
        why = _declared_unsupported(b, c, device) if isolate else None
        (settled if why else live).append((b, c, why))
    phases: dict = {}
    ran = 0
    with res_path.open("a") as f, Progress("gdncheck run", len(todo), enabled=progress) as bar:
        if not rd.resumed:
            f.write(header.model_dump_json() + "\n")
            f.flush()

        def record(b: Backend, c: Case, r: CaseResult) -> None:
            nonlocal ran
            with lock:
                f.write(r.model_dump_json() + "\n")
                f.flush()
                ran += 1
                if on_result is not None:
                    on_result(r)
                bar.advance(f"{b.name}: {r.status}")

        try:
            for b, c, why in settled:
                record(b, c, CaseResult(status="unsupported", reason=why, **base_of(b, c)))
            live_pairs = [(b, c) for b, c, _ in live]
            if sanitize and live_pairs:
                from gdncheck.sanitize import run_pairs
                run_pairs(live_pairs, specs, sanitize, record, device=device, jobs=jobs,
                          log_dir=rd.path / "sanitizer")
            elif isolate and live_pairs:
                phases = _run_in_lanes(live_pairs, device, max(1, jobs), specs, twin_for, base_of, record, t_start)
            else:
                twins: dict[str | None, Backend | None] = {None: None}
                seen: dict[str, set] = {}
                for b, c in live_pairs:
                    t = twin_for(b)
                    if t not in twins:
                        twins[t] = load_backend(t)
                    record(b, c, run_case(b, c, device=device, seen_keys=seen.setdefault(b.name, set()),
                                          twin=twins[t], worker=f"pid{os.getpid()}@{device}", spec=specs[b.name]))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {len(rd.done) + ran} of {len(pairs)} planned pairs recorded in "
                              f"{res_path}; continue with: {resume_command(rd.path)}") from None
    if phases and progress:
        print("run: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()), file=sys.stderr, flush=True)
    return RunOutcome(rd, header, len(pairs), ran, time.perf_counter() - t_start, phases)


def _run_in_lanes(pairs, device: str, jobs: int, specs, twin_for, base_of, record, t_start: float) -> dict:
    """Pairs through worker processes: compile-key units over ``jobs`` lanes (one lane per
    backend with ``jobs == 1``), memory admission, crash isolation (:func:`gdncheck.execute.run_units`)."""
    budget = memory_budget(device)
    # Cases that fit only alone would hold every lane idle while they wait for the GPU to drain
    # and while they run; at the end they take their turns with no other lane left to drain.
    alone = [(b, c) for b, c in pairs if case_bytes(c) > budget and jobs > 1]
    units = schedule([(b, c) for b, c in pairs if (b, c) not in alone], lanes=jobs)
    if jobs == 1:  # one worker per backend, in plan order (a crash replaces only that worker)
        units = [[p for p in pairs if p[0].name == name] for name in dict.fromkeys(b.name for b, _ in pairs)]
        alone = []
    absent: dict[str, str | None] = {}

    def job(b: Backend, c: Case) -> Job:
        spec = specs[b.name]

        def skip(lane: Lane) -> bool:  # the backend's package is missing in a worker: asked once
            if spec not in absent:
                absent[spec] = lane.available(spec)
            if absent[spec]:
                record(b, c, CaseResult(status="unsupported", reason=absent[spec], **base_of(b, c)))
            return bool(absent[spec])

        def send(lane: Lane) -> CaseResult:
            start = time.perf_counter() - t_start
            try:
                r = lane.run(spec, twin_for(b), c, base_of(b, c))
            except Exception as e:  # noqa: BLE001 - e.g. a case that cannot be sent: one result lost, not the lane
                r = CaseResult(status="error", reason=f"lane: {type(e).__name__}: {e}"[:2000], **base_of(b, c))
            r.timing.start_s = round(start, 3)
            return r

        return Job(send=send, record=lambda r: record(b, c, r), need=case_bytes(c) if jobs > 1 else 0,
                   oom=lambda r: jobs > 1 and r.status == "error" and is_oom(r.reason or ""), skip=skip)

    first = [[s for s in (specs[u[0][0].name], twin_for(u[0][0])) if s] for u in units[:jobs]] or [[]]
    lanes = start_lanes(device, min(jobs, max(1, len(units))), first)
    with closing(lanes):
        return run_units([[job(b, c) for b, c in u] for u in units], lanes, budget,
                         alone=[job(b, c) for b, c in alone], locks=[unit_lock(u) for u in units], t_start=t_start)


def check_device(device: str) -> None:
    """An :class:`EnvironmentProblem` when ``device`` asks for CUDA and none is visible."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EnvironmentProblem(f"--device {device} but no CUDA device is visible")
