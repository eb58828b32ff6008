"""The runner: suites x backends -> one :class:`CaseResult` per pair, streamed to JSONL.

Each result is appended and flushed as soon as it exists, so a killed run loses at most the
case in flight, and ``resume=True`` skips every (case, backend) pair already in the file.
With ``isolate=True`` each backend runs in a worker process: a crash, an illegal memory
access or a device-side assert is recorded for that case and a fresh worker takes over.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import traceback
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterable

import torch

from gdncheck.backends import Backend, Outputs, load_backend
from gdncheck.cases import Case, Inputs, load_suite, materialize
from gdncheck.oracle import expected
from gdncheck.report.schema import CaseResult, Environment, RunHeader, Timing

# Exception texts after which a CUDA context is unusable: the worker must be replaced.
_FATAL = ("illegal memory access", "device-side assert", "unspecified launch failure",
          "CUDA error: an illegal", "misaligned address", "CUDA-capable device")


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_rev() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip()
        if rev:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment(seeds: Iterable[int] = ()) -> Environment:
    """What the results depend on besides the cases: hardware, driver and package versions."""
    gpu = driver = cuda = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        cuda = torch.version.cuda
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip() or None
        except (OSError, subprocess.SubprocessError):
            driver = None
    return Environment(
        gpu=gpu, driver=driver, cuda=cuda, torch=torch.__version__,
        triton=_pkg_version("triton"), flashinfer=_pkg_version("flashinfer-python") or _flashinfer_version(),
        fla=_pkg_version("fla-core") or _module_version("fla"), gdncheck=_pkg_version("gdncheck"),
        git_rev=_git_rev(), python=platform.python_version(), host=platform.node(),
        command=" ".join(shlex.quote(a) for a in sys.argv), seeds=sorted(set(seeds)))


def _module_version(mod: str) -> str | None:
    try:
        return getattr(__import__(mod), "__version__", None)
    except Exception:  # noqa: BLE001 - a broken optional package must not stop the run
        return None


def _flashinfer_version() -> str | None:
    return _module_version("flashinfer")


def compile_key(backend: Backend, case: Case) -> tuple:
    """Cases with equal keys reuse one compiled kernel (T, heads, dims, dtypes, layout, scale are compile-time)."""
    fn = getattr(backend, "compile_key", None)
    if fn is not None:
        return tuple(fn(case))
    return (case.op, case.T if case.op != "prefill" else 0, case.H, case.HV, case.K, case.V, case.dtype,
            case.state_dtype, case.layout, case.scale, case.l2norm, case.gate_source, case.intermediate)


def schedule_key(backend: Backend, case: Case) -> tuple:
    """Cases with equal keys run in one process, one after another: the compile key, or a coarser
    key where the backend's kernels share compiled or autotuned state across compile keys."""
    fn = getattr(backend, "schedule_key", None)
    return tuple(fn(case)) if fn is not None else compile_key(backend, case)


def shard_of(case: Case, backend_name: str, n: int) -> int:
    """Deterministic shard of a (case, backend) pair."""
    h = hashlib.sha256(f"{case.id}:{backend_name}".encode()).hexdigest()
    return int(h[:8], 16) % n


# The oracle holds float64 copies of the pool (input and expected) beside the kernel's: a case
# whose pool exceeds this on the CPU is reported unsupported there rather than exhausting memory.
CPU_POOL_LIMIT_BYTES = 1 << 30


def pool_elements(case: Case) -> int:
    """Elements of the case's pool (or of its N initial states): ``rows * HS * K * V``."""
    rows = case.pool_size if case.pool_size is not None else case.N
    return rows * case.HS * case.K * case.V


def too_large(case: Case, device: torch.device) -> str | None:
    """Reason a case cannot run on ``device`` for memory, or None."""
    nbytes = pool_elements(case) * 8
    if device.type == "cpu" and nbytes > CPU_POOL_LIMIT_BYTES:
        return (f"pool of {nbytes / 2**30:.1f} GiB in float64 exceeds the CPU limit of "
                f"{CPU_POOL_LIMIT_BYTES / 2**30:.0f} GiB per case; run it on a GPU")
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend_device(backend: Backend, device: str | torch.device) -> torch.device:
    """Where ``backend`` runs: CPU-only backends (the interpreter) on the CPU; twins ('any') and
    kernels on the run's device."""
    return torch.device("cpu") if backend.caps.device == "cpu" else torch.device(device)


def run_case(backend: Backend, case: Case, *, device: str = "cpu", seen_keys: set | None = None,
             twin: Backend | None = None, worker: str = "") -> CaseResult:
    """Run one case on one backend and judge it against the oracle. Never raises for kernel errors."""
    t0 = time.perf_counter()
    dev = backend_device(backend, device)
    reason = backend.available() or backend.supports(case) or too_large(case, dev)
    if reason:
        return CaseResult(status="unsupported", reason=reason, **_base(backend, case, dev, worker))
    try:
        inputs = materialize(case, dev)
    except Exception as e:  # noqa: BLE001 - e.g. out of device memory: a result, not a stop
        return CaseResult(status="error", reason=f"materialize: {type(e).__name__}: {e}"[:2000],
                          **_base(backend, case, dev, worker))
    res = run_inputs(backend, inputs, seen_keys=seen_keys, twin=twin, worker=worker)[0]
    res.timing.wall_s = time.perf_counter() - t0
    return res


def _base(backend: Backend, case: Case, dev: torch.device, worker: str) -> dict:
    return dict(case_id=case.id, case=case, backend=backend.name, backend_version=backend.version(),
                device=str(dev) if dev.type != "cuda" else f"{dev}:{torch.cuda.get_device_name(dev)}",
                worker=worker, repro=case.repro() + f" --backend {backend.name}")


def run_inputs(backend: Backend, inputs: Inputs, *, seen_keys: set | None = None, twin: Backend | None = None,
               worker: str = "") -> tuple[CaseResult, Outputs | None]:
    """Run ``backend`` on ``inputs`` (moved to its device; built by :func:`materialize` or loaded
    from a repro bundle) and judge the outputs. Returns the result and the outputs (None on error).

    On the first call of a new compile key (``seen_keys``) the kernel runs once more on a copy,
    and the difference of the two times is reported as compile time. The precision twin, when
    given, reruns the same inputs on its own device and supplies the ``in_twins`` unit.
    """
    from gdncheck import metrics  # imported here: heavy, and workers import it once

    case = inputs.case
    dev = backend_device(backend, inputs.q.device)
    base = _base(backend, case, dev, worker)
    reason = backend.available() or backend.supports(case)
    if reason:
        return CaseResult(status="unsupported", reason=reason, **base), None
    policy = backend.policy(case)
    timing = Timing()
    try:
        inputs = inputs.clone(dev)
        before = inputs.clone()
        key = compile_key(backend, case)
        first = seen_keys is not None and key not in seen_keys
        if first:
            warm = inputs.clone()
            _sync(dev)
            t0 = time.perf_counter()
            backend.run(warm)
            _sync(dev)
            t_first = time.perf_counter() - t0
            seen_keys.add(key)
            del warm
        _sync(dev)
        t0 = time.perf_counter()
        out = backend.run(inputs)
        _sync(dev)
        timing.run_s = time.perf_counter() - t0
        if first:
            timing.compile_s = max(t_first - timing.run_s, 0.0)
    except Exception as e:  # noqa: BLE001 - a kernel error is a result, not a stop
        text = f"{type(e).__name__}: {e}".strip()
        if type(e).__name__ == "DocumentedRejection":  # gdncheck.backends.flashinfer_api: the documented error
            return CaseResult(status="unsupported", reason=f"rejected as documented: {e}"[:2000], policy=policy,
                              timing=timing, **base), None
        fatal = any(s in text for s in _FATAL)
        return CaseResult(status="crash" if fatal else "error", reason=text[:2000], policy=policy,
                          timing=timing, extra={"traceback": traceback.format_exc(limit=6)[-4000:]}, **base), None
    extra: dict = {}
    try:
        t0 = time.perf_counter()
        exp = expected(before, policy, backend.zero_length_policy, device=dev)
        _sync(dev)
        timing.oracle_s = time.perf_counter() - t0
        twin_out = None
        if twin is not None and twin.name != backend.name and twin.supports(case) is None:
            try:
                twin_out = twin.run(before.clone(backend_device(twin, dev)))
            except Exception as e:  # noqa: BLE001 - the twin only refines the floor
                if _is_oom(str(e)):
                    raise
                extra["twin_error"] = f"{type(e).__name__}: {e}"[:500]
        m, contracts = metrics.evaluate(before, out, exp, twin=twin_out)
    except Exception as e:  # noqa: BLE001 - e.g. the float64 oracle out of device memory beside other workers
        return CaseResult(status="error", reason=f"judging (oracle, twin, metrics): {type(e).__name__}: {e}"[:2000],
                          path=out.path, policy=policy, timing=timing,
                          extra={"traceback": traceback.format_exc(limit=6)[-4000:]}, **base), None
    status = "nan" if contracts.nan_where_finite else "ok"
    return CaseResult(status=status, path=out.path, policy=policy, adapter_work=out.adapter_work,
                      metrics=m, contracts=contracts, timing=timing, extra=extra, **base), out


def _is_oom(text: str) -> bool:
    """An out-of-memory error (torch's and CUDA's texts both say so), from its text or a result's reason."""
    return "out of memory" in text.lower()


def release_device_memory() -> None:
    """Hand a big case's cached device memory back to the other processes sharing the GPU."""
    if torch.cuda.is_available() and torch.cuda.memory_reserved() > 2 << 30:
        torch.cuda.empty_cache()


def worker_threads(jobs: int) -> int:
    """torch CPU threads per worker: a share of the cores, never more than this process uses."""
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // jobs))


# ---------------------------------------------------------------- worker processes

def _worker_main(conn, device: str, worker: str, threads: int | None, preload: tuple[str, ...] = ()) -> None:
    """Worker loop: receives ``(backend spec, twin spec, case JSON)``, sends CaseResult JSON; exits on None.

    Backends load once per spec and keep their compiled kernels; ``threads`` caps torch's CPU
    threads so that parallel workers do not oversubscribe the cores (twins and floors run there).
    ``preload`` backends are loaded (and their packages imported) before the first message, while
    the parent is still planning.
    """
    if threads:
        torch.set_num_threads(threads)
    from gdncheck import metrics  # noqa: F401 - imported before the first case, not during it

    backends: dict[str | None, Backend | None] = {None: None}
    for s in preload:
        try:
            backends[s] = load_backend(s)
            backends[s].available()
        except Exception:  # noqa: BLE001 - the run reports it on the first case of that backend
            backends.pop(s, None)
    seen: dict[str, set] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            break
        if msg[0] == "?":  # availability of a backend in a worker process
            try:
                why = load_backend(msg[1]).available()
            except Exception:  # noqa: BLE001 - the run reports it on the first case
                why = None
            conn.send(why)
            continue
        spec, twin_spec, case_json = msg
        for s in (spec, twin_spec):
            if s not in backends:
                backends[s] = load_backend(s)
        case = Case.model_validate_json(case_json)
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        res = run_case(backends[spec], case, device=device, seen_keys=seen.setdefault(spec, set()),
                       twin=backends[twin_spec], worker=worker)
        if cuda and res.status != "unsupported":
            res.timing.peak_gib = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        conn.send(res.model_dump_json())
        if res.status == "crash":
            break  # the CUDA context may be poisoned; the parent starts a fresh worker
        release_device_memory()
    # Every result is sent: skip the interpreter's teardown of kernel packages and the CUDA
    # context (seconds per worker), which the driver reclaims with the process anyway.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Lane:
    """A worker process that runs cases of any backend; replaced after a crash or a timeout."""

    def __init__(self, device: str, name: str = "lane", timeout_s: float = 900.0, threads: int | None = None,
                 preload: Iterable[str] = ()):
        self.device, self.name, self.timeout_s, self.threads = device, name, timeout_s, threads
        self.preload = tuple(preload)
        self._ctx = mp.get_context("spawn")
        self._proc: mp.Process | None = None
        self._conn = None
        self._n = 0

    def start(self) -> "Lane":
        """Start the worker now (it imports while the caller goes on), unless it runs."""
        if self._proc is None or not self._proc.is_alive():
            parent, child = self._ctx.Pipe()
            self._n += 1
            self._proc = self._ctx.Process(
                target=_worker_main, daemon=True,
                args=(child, self.device, f"{self.name}#{self._n}@{self.device}", self.threads, self.preload))
            self._proc.start()
            child.close()
            self._conn = parent
        return self

    def _ask(self, msg) -> tuple[bool, object]:
        """Send ``msg`` to the worker (started if needed): ``(True, reply)``, or ``(False, why
        none came)`` after a timeout or the worker's death (the worker is then gone)."""
        self.start()
        try:
            self._conn.send(msg)
            if self._conn.poll(self.timeout_s):
                return True, self._conn.recv()
            why = f"timeout after {self.timeout_s:.0f} s"
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            self._proc.join(5)
            why = f"worker died (exit code {self._proc.exitcode})"
        self.close(kill=True)
        return False, why

    def run(self, spec: str, twin_spec: str | None, case: Case, base_result: dict) -> CaseResult:
        ok, reply = self._ask((spec, twin_spec, case.model_dump_json()))
        if not ok:
            return CaseResult(status="crash", reason=reply, **base_result)
        res = CaseResult.model_validate_json(reply)
        if res.status == "crash":
            self.close()
        return res

    def available(self, spec: str) -> str | None:
        """``available()`` of backend ``spec`` as a worker process sees it (None if it cannot say)."""
        ok, reply = self._ask(("?", spec))
        return reply if ok else None

    def close(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        p, conn, self._proc, self._conn = self._proc, self._conn, None, None
        try:
            if not kill and p.is_alive():
                conn.send(None)
                p.join(10)
        except (BrokenPipeError, OSError):
            pass
        if p.is_alive():
            p.kill()
            p.join(5)


def case_bytes(case: Case) -> int:
    """Peak device bytes of one case in its worker (kernel, float64 oracle, twin, metrics).

    Fitted to the peaks that H100 runs recorded (``Timing.peak_gib``, 222 cases of the smoke,
    models and edges suites up to 72 GiB): 36 B per pool element (copies, bit-identity checks),
    56 more per element of the rows the call writes (float64 metrics), 80 per intermediate-state
    and per token element (q, k, v, o through the oracle), and 0.3 GiB per case. It falls short
    of a measured peak by 7% at most.
    """
    inter = case.B * case.T * case.HS * case.K * case.V if case.intermediate else 0
    written = case.N * case.HS * case.K * case.V
    tokens = case.T * case.HS * (case.K + case.V)
    return 36 * pool_elements(case) + 56 * written + 80 * (inter + tokens) + (3 << 30) // 10


def memory_budget(device: str) -> int:
    """Bytes the parallel workers' cases may hold at once: 70% of the device's memory (half the
    host's for the CPU)."""
    if device.startswith("cuda"):
        return int(0.7 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class Admission:
    """First come, first served admission of cases into a device-memory budget (bytes).

    A case waits until every case that asked before it has started and its bytes fit beside the
    cases in flight (alone, any case fits). Without the order, a case that needs most of the
    budget waits for a moment when no other lane holds a case, and lanes that go from case to
    case may never leave one: on the H100 ten lanes waited minutes behind two.
    """

    def __init__(self, budget: int, cond: threading.Condition):
        self.budget, self.cond = budget, cond
        self.held = 0
        self._next = self._serving = 0

    def acquire(self, need: int) -> None:
        with self.cond:
            mine, self._next = self._next, self._next + 1
            while self._serving != mine or (self.held and self.held + need > self.budget):
                self.cond.wait()
            self._serving += 1
            self.held += need
            self.cond.notify_all()

    def release(self, need: int) -> None:
        with self.cond:
            self.held -= need
            self.cond.notify_all()


def schedule(pairs: list[tuple[Backend, Case]]) -> list[list[tuple[Backend, Case]]]:
    """Pairs in work units for parallel lanes, in start order.

    A unit is one backend's cases of one :func:`schedule_key`, compiled once in one process.
    Longest units start first: by the backend's compile hint, then memory (big cases take
    longer), then size.
    """
    units: dict[tuple, list] = {}
    for b, c in pairs:
        units.setdefault((b.name, repr(schedule_key(b, c))), []).append((b, c))

    def cost(u) -> float:
        return u[0][0].compile_hint_s + max(case_bytes(c) for _, c in u) / (1 << 30) + 0.05 * len(u)

    # Units whose builds serialise on a lock form a chain that one lane works through from the
    # start (:func:`_run_lanes` gives a lock to one lane at a time), so they lead the order.
    return sorted(units.values(), key=lambda u: (unit_lock(u) is None, -cost(u), u[0][0].name,
                                                 repr(schedule_key(u[0][0], u[0][1]))))


def unit_lock(unit: list[tuple[Backend, Case]]) -> str | None:
    """The compile lock of a unit's kernels (:meth:`Backend.compile_lock` of its first case)."""
    b, c = unit[0]
    try:
        return b.compile_lock(c)
    except Exception:  # noqa: BLE001 - a plugin's hint must not stop the run
        return None


# ---------------------------------------------------------------- the run

def read_done(path: Path) -> set[tuple[str, str]]:
    """(case_id, backend) pairs already recorded in a results file; ignores a torn last line."""
    done: set[tuple[str, str]] = set()
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if d.get("kind") != "header" and "case_id" in d:
            done.add((d["case_id"], d["backend"]))
    return done


def _repair_tail(path: Path) -> None:
    """Drop a torn last line left by a killed run, so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def plan(suites: list[str], backends: list[Backend], shard: tuple[int, int] | None = None):
    """(backend, case) pairs in run order: per backend, grouped by compile key."""
    cases: list[Case] = []
    seen: set[str] = set()
    for s in suites:
        for c in load_suite(s):
            if c.id not in seen:
                seen.add(c.id)
                cases.append(c)
    pairs = []
    for b in backends:
        mine = [c for c in cases if shard is None or shard_of(c, b.name, shard[1]) == shard[0]]
        mine.sort(key=lambda c: repr(compile_key(b, c)))
        pairs += [(b, c) for c in mine]
    return pairs


def run(suites: list[str], backend_specs: list[str], out: Path, *, device: str | None = None,
        isolate: bool | None = None, resume: bool = True, shard: tuple[int, int] | None = None,
        twin_spec: str | None = "auto", progress: bool = True, on_result=None, jobs: int = 1) -> Path:
    """Run ``suites`` x ``backend_specs``, appending results to ``out`` (JSONL). Returns ``out``.

    ``jobs > 1`` runs that many worker processes side by side on ``device`` (implies isolation):
    each takes whole compile-key units (:func:`schedule`), so kernels compile in parallel and
    each compiles once; cases start within a device-memory budget, and one that runs out of
    memory beside the others anyway is rerun alone at the end. Kernel and compile times of
    parallel workers overlap and include contention.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    device = device or default_device()
    isolate = (device.startswith("cuda") or jobs > 1) if isolate is None else isolate
    if jobs > 1 and not isolate:
        raise ValueError("jobs > 1 runs worker processes: it cannot be combined with isolate=False")
    backends = [load_backend(s) for s in backend_specs]
    pairs = plan(suites, backends, shard)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(out)
    done = read_done(out) if resume else set()
    if not resume and out.exists():
        out.unlink()
    todo = [(b, c) for b, c in pairs if (c.id, b.name) not in done]
    header_needed = not out.exists() or out.stat().st_size == 0
    specs = dict(zip([b.name for b in backends], backend_specs))
    twins: dict[str, Backend | None] = {}
    seen_keys: dict[str, set] = {b.name: set() for b in backends}
    lock = threading.Lock()

    def twin_for(b: Backend) -> str | None:
        if twin_spec == "auto":
            return b.twin
        return twin_spec

    def base_of(b: Backend, c: Case) -> dict:
        return dict(case_id=c.id, case=c, backend=b.name, backend_version=b.version(),
                    device=device, repro=c.repro() + f" --backend {b.name}")

    t_start = time.perf_counter()
    settled: list[tuple[Backend, Case, str]] = []
    if isolate:  # declared limits need no worker (nor a share of the memory budget)
        todo = [(b, c) for b, c in todo if not _declared_unsupported(b, c, device, settled)]
    lanes: list[Lane] = []
    if jobs > 1 and todo:
        budget = memory_budget(device)
        # Cases that fit only alone would hold every lane idle while they wait for the GPU to drain
        # and while they run; at the end they take their turns with no other lane left to drain.
        alone = [(b, c) for b, c in todo if case_bytes(c) > budget]
        units = schedule([(b, c) for b, c in todo if case_bytes(c) <= budget])
        # Workers import torch and the package of the unit they take first while the header is
        # written (all packages in every worker would delay the first case by seconds).
        first = [[s for s in (specs[u[0][0].name], twin_for(u[0][0])) if s] for u in units[:jobs]] or [[]]
        lanes = [Lane(device, f"lane{i}", threads=worker_threads(jobs), preload=pre).start()
                 for i, pre in enumerate(first)]
    phases: dict[str, float] = {}

    with _closed_at_exit(lanes), out.open("a") as f:
        if header_needed:
            hdr = RunHeader(run_id=uuid.uuid4().hex[:12], suites=suites, backends=[b.name for b in backends],
                            environment=environment(c.seed for _, c in pairs),
                            shard=f"{shard[0]}/{shard[1]}" if shard else None, jobs=jobs)
            f.write(hdr.model_dump_json() + "\n")
            f.flush()
        cols = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[last]}"))
        with Progress(*cols, disable=not progress, transient=False) as bar:
            task = bar.add_task("gdncheck run", total=len(todo), last="")

            def record(b: Backend, c: Case, res: CaseResult) -> None:
                with lock:
                    f.write(res.model_dump_json() + "\n")
                    f.flush()
                    if on_result is not None:
                        on_result(res)
                    bar.update(task, advance=1, last=f"{b.name} {c.name or c.id}: {res.status}")

            for b, c, why in settled:
                record(b, c, CaseResult(status="unsupported", reason=why, **base_of(b, c)))
            if lanes:  # jobs > 1 with work left
                phases = _run_lanes(units, alone, budget, lanes, specs, twin_for, base_of, record, t_start)
            elif isolate:
                per_backend: dict[str, Lane] = {}  # one worker process per backend
                try:
                    for b, c in todo:
                        if b.name not in per_backend:
                            per_backend[b.name] = Lane(device, b.name)
                        lane = per_backend[b.name]
                        record(b, c, lane.run(specs[b.name], twin_for(b), c, base_of(b, c)))
                finally:
                    for lane in per_backend.values():
                        lane.close()
            else:
                for b, c in todo:
                    tname = twin_for(b)
                    if tname not in twins:
                        twins[tname] = load_backend(tname) if tname else None
                    record(b, c, run_case(b, c, device=device, seen_keys=seen_keys[b.name], twin=twins[tname],
                                          worker=f"pid{os.getpid()}@{device}"))
    if phases:
        print("run: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()), file=sys.stderr, flush=True)
    return out


@contextlib.contextmanager
def _closed_at_exit(lanes: list[Lane]):
    """Close ``lanes`` however the block ends: none outlives a run that failed before they ran."""
    try:
        yield
    finally:
        for lane in lanes:
            lane.close()


def _declared_unsupported(b: Backend, c: Case, device: str, settled: list) -> bool:
    """Append ``(b, c, why)`` to ``settled`` when ``b``'s declared capabilities or the case's size
    rule the pair out."""
    try:
        why = b.supports(c) or too_large(c, backend_device(b, device))
    except Exception:  # noqa: BLE001 - a plugin's supports() that raises: its worker reports it
        return False
    if why:
        settled.append((b, c, why))
    return bool(why)


def _run_lanes(units, alone, budget: int, lanes: list[Lane], specs, twin_for, base_of, record,
               t_start: float) -> dict[str, float]:
    """Run :func:`schedule`'s ``units`` in ``lanes`` (threads here, one worker process each, started
    by the caller). Cases are admitted in turn into ``budget`` bytes (:class:`Admission`); the
    ``alone`` pairs, past the budget, and those that run out of memory beside others anyway run
    alone at the end. A lane's worker exits as soon as no unit is left for it.

    Returns the run's phases in seconds since ``t_start``: when lanes took their first case
    (``first case at``), when the last lane ran out of units (``lanes done at``) and when every
    worker was gone.
    """
    lock = threading.Condition()
    admit = Admission(budget, lock)
    retry: list[tuple[Backend, Case]] = []
    absent: dict[str, str | None] = {}  # backend spec -> why it is not available in a worker
    t_run = time.perf_counter()
    starts: list[float] = []

    locks = [unit_lock(u) for u in units]
    held_locks: set[str] = set()

    def take() -> tuple[list, str | None] | None:
        """The first unit whose compile lock no other lane holds (None when none is left)."""
        with lock:
            while units:
                for i, name in enumerate(locks):
                    if name is None or name not in held_locks:
                        if name is not None:
                            held_locks.add(name)
                        del locks[i]
                        return units.pop(i), name
                lock.wait()  # every unit left waits on a lock another lane holds
            return None

    def drive(lane: Lane) -> None:
        while True:
            got = take()
            if got is None:
                lane.close()  # its device memory back to the others; workers exit side by side
                return
            unit, name = got
            try:
                run_unit(lane, unit)
            finally:
                if name is not None:
                    with lock:
                        held_locks.discard(name)
                        lock.notify_all()

    def absent_here(lane: Lane, b: Backend, c: Case) -> bool:
        """Record ``(b, c)`` as unsupported when ``b``'s package is missing in a worker (asked once)."""
        spec = specs[b.name]
        if spec not in absent:
            absent[spec] = lane.available(spec)
        if absent[spec]:
            record(b, c, CaseResult(status="unsupported", reason=absent[spec], **base_of(b, c)))
        return bool(absent[spec])

    def attempt(lane: Lane, b: Backend, c: Case) -> CaseResult:
        start = time.perf_counter() - t_run
        starts.append(start)
        try:
            res = lane.run(specs[b.name], twin_for(b), c, base_of(b, c))
            res.timing.start_s = round(start, 3)
        except Exception as e:  # noqa: BLE001 - e.g. a case that cannot be sent: one result lost, not the lane
            res = CaseResult(status="error", reason=f"lane: {type(e).__name__}: {e}"[:2000], **base_of(b, c))
        return res

    def run_unit(lane: Lane, unit: list) -> None:
        for b, c in unit:
            if absent_here(lane, b, c):
                continue
            need = case_bytes(c)
            admit.acquire(need)
            try:
                res = attempt(lane, b, c)
            finally:
                admit.release(need)
            if res.status == "error" and _is_oom(res.reason or ""):
                with lock:
                    retry.append((b, c))
                continue
            record(b, c, res)

    try:
        pool = [threading.Thread(target=drive, args=(lane,), daemon=True) for lane in lanes]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        t_last = time.perf_counter()
        for b, c in alone + retry:  # every other lane is closed: each runs alone
            if not absent_here(lanes[0], b, c):
                record(b, c, attempt(lanes[0], b, c))
    finally:
        for lane in lanes:
            lane.close()
    t_end = time.perf_counter()
    phases = {"setup": t_run - t_start}
    if starts:
        phases["first case at"] = t_run - t_start + min(starts)
    phases["lanes done at"] = t_last - t_start
    if alone or retry:
        phases[f"{len(alone)} cases alone and {len(retry)} out-of-memory reruns until"] = t_end - t_start
    phases["workers gone at"] = t_end - t_start
    return phases
