"""The executor: runs one case on one backend and judges its outputs against the oracle, in this
process or in worker processes (lanes) with crash isolation, compile-key units and memory admission.

Every workflow that runs kernels (``run``, ``gate``, ``fuzz``, ``repro``, ``ablate``, ``explain``)
goes through :func:`run_case` / :func:`run_inputs` here, and every parallel one through
:func:`run_units`, so a crash, an illegal memory access, an out-of-memory error or a hung kernel
is a result for the work in flight, and a fresh worker takes over.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from gdncheck import redzone
from gdncheck.backends import Backend, Outputs, load_backend
from gdncheck.data.case import Case
from gdncheck.data.results import CaseResult, Environment, Timing
from gdncheck.inputs import Inputs, materialize
from gdncheck.oracle import expected

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
        fla=_pkg_version("fla-core") or _module_version("fla"), sglang=_pkg_version("sglang"),
        vllm=_pkg_version("vllm"), gdncheck=_pkg_version("gdncheck"),
        git_rev=_git_rev(), python=platform.python_version(), host=platform.node(),
        command=" ".join(shlex.quote(a) for a in sys.argv), seeds=sorted(set(seeds)))


def _module_version(mod: str) -> str | None:
    try:
        return getattr(__import__(mod), "__version__", None)
    except Exception:  # noqa: BLE001 - a broken optional package must not stop the run
        return None


def _flashinfer_version() -> str | None:
    return _module_version("flashinfer")



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



def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_case(backend: Backend, case: Case, *, device: str = "cpu", seen_keys: set | None = None,
             twin: Backend | None = None, worker: str = "", spec: str | None = None) -> CaseResult:
    """Run one case on one backend and judge it against the oracle. Never raises for kernel errors."""
    t0 = time.perf_counter()
    dev = backend_device(backend, device)
    reason = backend.available() or backend.supports(case) or too_large(case, dev)
    if reason:
        return CaseResult(status="unsupported", reason=reason, **_base(backend, case, dev, worker, spec))
    try:
        inputs = materialize(case, dev)
    except Exception as e:  # noqa: BLE001 - e.g. out of device memory: a result, not a stop
        return CaseResult(status="error", reason=f"materialize: {type(e).__name__}: {e}"[:2000],
                          **_base(backend, case, dev, worker, spec))
    res = run_inputs(backend, inputs, seen_keys=seen_keys, twin=twin, worker=worker, spec=spec)[0]
    res.timing.wall_s = time.perf_counter() - t0
    return res


def _base(backend: Backend, case: Case, dev: torch.device, worker: str, spec: str | None = None) -> dict:
    return dict(case_id=case.id, case=case, backend=backend.name, backend_version=backend.version(),
                device=str(dev) if dev.type != "cuda" else f"{dev}:{torch.cuda.get_device_name(dev)}",
                worker=worker, repro=case.repro(spec or backend.name))


def run_inputs(backend: Backend, inputs: Inputs, *, seen_keys: set | None = None, twin: Backend | None = None,
               worker: str = "", spec: str | None = None) -> tuple[CaseResult, Outputs | None]:
    """Run ``backend`` on ``inputs`` (moved to its device; built by :func:`materialize` or loaded
    from a repro bundle) and judge the outputs. Returns the result and the outputs (None on error).

    On the first call of a new compile key (``seen_keys``) the kernel runs once more on a copy,
    and the difference of the two times is reported as compile time. The precision twin, when
    given, reruns the same inputs on its own device and supplies the ``in_twins`` unit.
    """
    from gdncheck import metrics  # imported here: heavy, and workers import it once

    case = inputs.case
    dev = backend_device(backend, inputs.q.device)
    base = _base(backend, case, dev, worker, spec)
    reason = backend.available() or backend.supports(case)
    if reason:
        return CaseResult(status="unsupported", reason=reason, **base), None
    policy = backend.policy(case)
    timing = Timing()
    zone = contextlib.ExitStack()  # red zones: guarded copies of the inputs, open until the call returns
    try:
        rz, inputs = zone.enter_context(redzone.session(inputs, dev))
        before = inputs.clone()
        key = backend.compile_key(case)
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
        zone.close()
        text = f"{type(e).__name__}: {e}".strip()
        if type(e).__name__ == "DocumentedRejection":  # gdncheck.backends.flashinfer_api: the documented error
            return CaseResult(status="unsupported", reason=f"rejected as documented: {e}"[:2000], policy=policy,
                              timing=timing, **base), None
        fatal = any(s in text for s in _FATAL)
        return CaseResult(status="crash" if fatal else "error", reason=text[:2000], policy=policy,
                          timing=timing, extra={"traceback": traceback.format_exc(limit=6)[-4000:]}, **base), None
    zone.close()
    guard_violations = redzone.violations(rz, before, inputs)  # before judging reads (and may move) them
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
                if is_oom(str(e)):
                    raise
                extra["twin_error"] = f"{type(e).__name__}: {e}"[:500]
        m, contracts = metrics.evaluate(before, out, exp, twin=twin_out)
        redzone.record(contracts, *guard_violations)
    except Exception as e:  # noqa: BLE001 - e.g. the float64 oracle out of device memory beside other workers
        return CaseResult(status="error", reason=f"judging (oracle, twin, metrics): {type(e).__name__}: {e}"[:2000],
                          path=out.path, policy=policy, timing=timing,
                          extra={"traceback": traceback.format_exc(limit=6)[-4000:]}, **base), None
    status = "nan" if contracts.nan_where_finite else "ok"
    return CaseResult(status=status, path=out.path, policy=policy, adapter_work=out.adapter_work,
                      metrics=m, contracts=contracts, timing=timing, extra=extra, **base), out


def release_device_memory() -> None:
    """Hand a big case's cached device memory back to the other processes sharing the GPU."""
    if torch.cuda.is_available() and torch.cuda.memory_reserved() > 2 << 30:
        torch.cuda.empty_cache()


def worker_threads(jobs: int) -> int:
    """torch CPU threads per worker: a share of the cores, never more than this process uses."""
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // jobs))


def _worker_main(conn, device: str, worker: str, threads: int | None, preload: tuple[str, ...] = ()) -> None:
    """Worker loop; exits on None. Messages:

    - ``("?", spec)``: ``available()`` of a backend here -> reason or None;
    - ``("case", spec, twin spec, case JSON)`` -> the :class:`CaseResult` JSON of :func:`run_case`;
    - ``("call", "module:function", payload)`` -> JSON of ``function(payload)`` (a workflow's task,
      e.g. one ablation unit; the function must be importable at module level).

    Backends load once per spec and keep their compiled kernels; ``threads`` caps torch's CPU
    threads so that parallel workers do not oversubscribe the cores (twins and floors run there).
    ``preload`` backends are loaded (and their packages imported) before the first message, while
    the parent is still planning.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the lanes quietly
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
        if msg[0] == "call":
            mod, _, fn = msg[1].partition(":")
            try:
                reply = {"ok": getattr(importlib.import_module(mod), fn)(msg[2])}
            except Exception as e:  # noqa: BLE001 - a task's error is its result
                reply = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc(limit=6)[-4000:]}
            conn.send(json.dumps(reply, default=str))
            release_device_memory()
            continue
        _, spec, twin_spec, case_json = msg
        for s in (spec, twin_spec):
            if s not in backends:
                backends[s] = load_backend(s)
        case = Case.model_validate_json(case_json)
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        res = run_case(backends[spec], case, device=device, seen_keys=seen.setdefault(spec, set()),
                       twin=backends[twin_spec], worker=worker, spec=spec)
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

    def call(self, target: str, payload: Any) -> dict:
        """Run ``module:function(payload)`` in the worker: ``{"ok": value}`` or ``{"error": why}``
        (a crash or timeout of the worker is an error too; the worker is then replaced)."""
        ok, reply = self._ask(("call", target, payload))
        return json.loads(reply) if ok else {"error": f"worker lost: {reply}", "lost": True}

    def run(self, spec: str, twin_spec: str | None, case: Case, base_result: dict) -> CaseResult:
        ok, reply = self._ask(("case", spec, twin_spec, case.model_dump_json()))
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


# ---------------------------------------------------------------- lanes

@dataclass
class Job:
    """One piece of work for a lane: a case on a backend, or a workflow task.

    ``send(lane)`` runs it in the lane's worker and returns the reply; ``record(reply)`` keeps it;
    ``oom(reply)`` says it ran out of device memory beside other lanes (it is then rerun alone at
    the end); ``need`` is the device bytes admitted for it (:class:`Admission`).
    """

    send: Callable[["Lane"], Any]
    record: Callable[[Any], None]
    need: int = 0
    oom: Callable[[Any], bool] = lambda reply: False
    skip: Callable[["Lane"], bool] = lambda lane: False


def run_units(units: list[list[Job]], lanes: list["Lane"], budget: int, *, alone: list[Job] = (),
              locks: list[str | None] | None = None, t_start: float | None = None) -> dict[str, float]:
    """Run ``units`` (lists of jobs, in start order) in ``lanes`` (started by the caller; one
    thread here per lane). A unit stays in one lane, so its kernels compile once. Jobs are
    admitted in turn into ``budget`` bytes (:class:`Admission`); ``alone`` jobs (past the
    budget) and those that ran out of memory beside others run alone at the end. A unit with a
    compile lock (``locks[i]``) never runs beside another unit of the same lock. A lane's worker
    exits as soon as no unit is left for it.

    Lane ``i`` starts with unit ``i`` (the unit whose backends :func:`start_lanes` preloaded in
    it) when that unit's lock is free, so no lane waits for an import it will not use.

    Returns the phases in seconds since ``t_start``: first job, lanes done, workers gone.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    names = list(locks) if locks is not None else [None] * len(units)
    pending = [(i, u, name) for i, (u, name) in enumerate(zip(units, names))]
    lock = threading.Condition()
    admit = Admission(budget, lock)
    retry: list[Job] = []
    t_run = time.perf_counter()
    starts: list[float] = []
    held: set[str] = set()
    reserved = set(range(len(lanes)))  # units preloaded by a lane that has not started yet

    def take(prefer: int | None) -> tuple[list[Job], str | None] | None:
        """Unit ``prefer`` if its lock is free, else the first unit whose compile lock no other
        lane holds, another lane's preloaded unit last (None when none is left)."""
        with lock:
            reserved.discard(prefer)
            while pending:
                order = sorted(range(len(pending)),
                               key=lambda j: (pending[j][0] != prefer, pending[j][0] in reserved))
                for j in order:
                    _, unit, name = pending[j]
                    if name is None or name not in held:
                        if name is not None:
                            held.add(name)
                        del pending[j]
                        return unit, name
                lock.wait()  # every unit left waits on a lock another lane holds
            return None

    def attempt(lane: "Lane", job: Job) -> Any:
        starts.append(time.perf_counter() - t_run)
        return job.send(lane)

    def drive(lane: "Lane", first: int) -> None:
        prefer: int | None = first
        while True:
            got, prefer = take(prefer), None
            if got is None:
                lane.close()  # its device memory back to the others; workers exit side by side
                return
            unit, name = got
            try:
                for job in unit:
                    if job.skip(lane):
                        continue
                    admit.acquire(job.need)
                    try:
                        reply = attempt(lane, job)
                    finally:
                        admit.release(job.need)
                    if job.oom(reply):
                        with lock:
                            retry.append(job)
                        continue
                    with lock:
                        job.record(reply)
            finally:
                if name is not None:
                    with lock:
                        held.discard(name)
                        lock.notify_all()

    try:
        pool = [threading.Thread(target=drive, args=(lane, i), daemon=True) for i, lane in enumerate(lanes)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        t_last = time.perf_counter()
        for job in list(alone) + retry:  # every other lane is closed: each runs alone
            if not job.skip(lanes[0]):
                reply = attempt(lanes[0], job)
                with lock:
                    job.record(reply)
    finally:
        for lane in lanes:
            lane.close()
    t_end = time.perf_counter()
    phases = {"setup": t_run - t_start}
    if starts:
        phases["first job at"] = t_run - t_start + min(starts)
    phases["lanes done at"] = t_last - t_start
    if alone or retry:
        phases[f"{len(alone)} jobs alone and {len(retry)} out-of-memory reruns until"] = t_end - t_start
    phases["workers gone at"] = t_end - t_start
    return phases


def start_lanes(device: str, jobs: int, preload: list[list[str]] | None = None) -> list["Lane"]:
    """``jobs`` lanes on ``device``, started now (they import while the caller plans); lane ``i``
    preloads the backend specs ``preload[i]``."""
    pre = preload or []
    return [Lane(device, f"lane{i}", threads=worker_threads(jobs), preload=pre[i] if i < len(pre) else ())
            .start() for i in range(jobs)]


@contextlib.contextmanager
def closing(lanes: list["Lane"]):
    """Close ``lanes`` however the block ends: none outlives a run that failed or was interrupted."""
    try:
        yield lanes
    finally:
        for lane in lanes:
            lane.close(kill=True)


def is_oom(text: str) -> bool:
    """An out-of-memory error (torch's and CUDA's texts both say so), from its text or a result's reason."""
    return "out of memory" in text.lower()
