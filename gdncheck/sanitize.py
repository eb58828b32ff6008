"""Run cases under NVIDIA compute-sanitizer, one process per case, and parse its report.

``gdncheck run|repro|gate --sanitize memcheck|initcheck|racecheck|synccheck`` runs each selected
(case, backend) pair as ``compute-sanitizer --tool X python -m gdncheck.sanitize child ...``.
The child runs the case once (no warm-up call, no precision twin: every kernel launch under the
tool costs a large factor) with

- ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``: every tensor is its own ``cudaMalloc``, so memcheck sees
  the end of each buffer instead of the end of a caching-allocator block, and initcheck sees
  fresh memory instead of memory an earlier tensor initialised;
- red zones on and announced: the child prints ``GDNCHECK-BUFFER {json}`` with the address
  ranges of every guarded buffer, and :func:`parse_report` maps each reported address onto them
  ("state + 2097152 bytes (row 1)", "out: after guard, 4 bytes past its end"). A write into a
  red zone stays inside the allocation, so memcheck does not see it; the red-zone contract does.

Any error the tool counts is a failure of that pair (``CaseResult.sanitizer``), judged by the gate
with the repro line ``... --backend B --sanitize X``.

The parser reads compute-sanitizer's text output (2023.x-2025.x): findings are the lines after the
``=========`` prefix that start unindented; their indented lines carry the kernel (``at ...``),
``by thread (x,y,z) in block (x,y,z)``, ``Address 0x... is ...`` and ``and is N bytes after the
nearest allocation at 0x... of size M bytes``; host backtraces are dropped. Unknown lines are kept
as text, so a format change loses fields, never findings.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gdncheck.data.errors import EnvironmentProblem, UsageError
from gdncheck.data.results import CaseResult, SanitizerFinding, SanitizerReport

TOOLS = ("memcheck", "initcheck", "racecheck", "synccheck")
#: seconds one sanitized case may take (process start, JIT, the call, the oracle) before it is killed
TIMEOUT_S = float(os.environ.get("GDNCHECK_SANITIZE_TIMEOUT", "1800"))
#: findings kept per result (the summary still counts them all)
MAX_FINDINGS = 50
BUFFER_TAG = "GDNCHECK-BUFFER "
#: cases above this many device bytes (:func:`gdncheck.run.case_bytes`) run alone
BIG_CASE_BYTES = 16 << 30


class SanitizerMissing(EnvironmentProblem):
    """compute-sanitizer is not installed where we look: an environment problem (exit 3)."""


def find_sanitizer() -> str | None:
    """Path of compute-sanitizer: ``$GDNCHECK_COMPUTE_SANITIZER``, PATH, ``$CUDA_HOME/bin``,
    ``/usr/local/cuda/bin``; None when none exists."""
    env = os.environ.get("GDNCHECK_COMPUTE_SANITIZER")
    if env:
        return env if os.access(env, os.X_OK) else None
    hit = shutil.which("compute-sanitizer")
    if hit:
        return hit
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            p = Path(root) / "bin" / "compute-sanitizer"
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    return None


def require(tool: str) -> str:
    """The sanitizer's path for ``tool``; ValueError for an unknown tool, :class:`SanitizerMissing`
    when the executable is not found or does not run."""
    if tool not in TOOLS:
        raise UsageError(f"--sanitize: unknown tool {tool!r}; one of {', '.join(TOOLS)}")
    exe = find_sanitizer()
    if exe is None:
        raise SanitizerMissing("compute-sanitizer not found (looked at $GDNCHECK_COMPUTE_SANITIZER, PATH, "
                               "$CUDA_HOME/bin, /usr/local/cuda/bin): --sanitize needs the CUDA toolkit's sanitizer")
    try:
        subprocess.run([exe, "--version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise SanitizerMissing(f"{exe} --version failed: {type(e).__name__}: {e}") from None
    return exe


# ---------------------------------------------------------------- parsing

_PREFIX = re.compile(r"^\s*={5,} ?(.*)$")
_SKIP = re.compile(r"^(COMPUTE-SANITIZER|LEAK SUMMARY|Target application returned an error"
                   r"|This tool is deprecated|Error: process didn't terminate successfully"
                   r"|Error: No attachable process found)", re.I)
_ERR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+errors?", re.I)
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY:.*?\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)", re.I)
_MEM = re.compile(r"^(Invalid|Uninitialized|Out-of-range|Misaligned)\s+(?:(__\w+__)\s+)?(?:memory\s+)?"
                  r"(read|write|atomic|access)\w*(?:\s+of\s+size\s+(\d+)(?:\s*bytes?)?)?", re.I)
_RACE = re.compile(r"^(Error|Warning):\s*Race reported between\s+(\w+)\s+access\s+at\s+(.+?)"
                   r"(?:\s+and\s+(\w+)\s+access\s+at\s+(.+?))?(?:\s*\[(\d+)\s+hazards?\])?\s*$", re.I)
_HAZARD = re.compile(r"^(ERROR|WARNING|Error|Warning):\s*Potential\s+(\w+)\s+hazard detected at\s+(__\w+__)\s+"
                     r"(0x[0-9a-fA-F]+)(?:\s+in\s+block\s+\((\d+),\s*(\d+),\s*(\d+)\))?")
_API = re.compile(r"^Program hit\s+(\w+)(?:\s+\(error\s+(\d+)\))?(?:\s+due to\s+\"(.*?)\")?"
                  r"(?:\s+on CUDA API call to\s+(\w+))?")
_AT = re.compile(r"^at\s+(.+?)(?:\s+in\s+(.+?))?\s*$")
_THREAD = re.compile(r"by thread \((\d+),\s*(\d+),\s*(\d+)\)\s+in block \((\d+),\s*(\d+),\s*(\d+)\)")
# compute-sanitizer 2025.3 writes "Access to 0x.. is out of bounds" and sizes with thousands separators
_ADDR = re.compile(r"^(?:Address|Access to)\s+(0x[0-9a-fA-F]+)(?:\s+is\s+(.+?))?\.?\s*$")
_NEAR = re.compile(r"and is\s+([\d,]+)\s+bytes\s+(before|after)\s+the nearest allocation at\s+(0x[0-9a-fA-F]+)"
                   r"\s+of size\s+([\d,]+)\s+bytes", re.I)
_INSIDE = re.compile(r"and is inside the nearest allocation at\s+(0x[0-9a-fA-F]+)\s+of size\s+([\d,]+)\s+bytes", re.I)
_AND_ACCESS = re.compile(r"^and\s+(\w+)\s+access\s+at\s+(.+?)(?:\s*\[(\d+)\s+hazards?\])?\s*$", re.I)
_HAZ_THREAD = re.compile(r"^(Write|Read)\s+Thread\s+\((\d+),\s*(\d+),\s*(\d+)\)\s+at\s+(.+?)\s*$")


def _kernel_of(loc: str, src: str | None) -> tuple[str | None, str | None]:
    """(kernel, location) from an ``at`` line: ``k+0x1b0 in f.py:12`` or the older
    ``0x1d0 in /p/k.cu:8:kernel(int *)``."""
    if re.fullmatch(r"0x[0-9a-fA-F]+", loc) and src:
        m = re.match(r"^(.*?:\d+):(.+)$", src)
        return (m.group(2).strip(), m.group(1)) if m else (None, src)
    return re.sub(r"\+0x[0-9a-fA-F]+$", "", loc).strip(), src


def _new_finding(head: str) -> SanitizerFinding:
    f = SanitizerFinding(kind=head.strip()[:200])
    m = _MEM.match(head)
    if m:
        word, space, access, size = m.groups()
        f.severity = "error"
        f.access = access.lower()
        f.space = space.strip("_") if space else None
        f.size = int(size) if size else None
        f.kind = " ".join(x for x in (word, space, "memory" if word.lower() == "uninitialized" else None,
                                      access.lower()) if x)
        return f
    m = _RACE.match(head)
    if m:
        sev, a1, at1, a2, at2, n = m.groups()
        f.severity = "warning" if sev.lower() == "warning" else "error"
        f.kind = f"race {a1}/{a2}" if a2 else f"race {a1}"
        f.access = a1.lower()
        f.kernel, f.location = _kernel_of(*_split_at(at1))
        f.hazards = int(n) if n else None
        return f
    m = _HAZARD.match(head)
    if m:
        sev, what, space, addr = m.group(1), m.group(2), m.group(3), m.group(4)
        f.severity = "warning" if sev.lower() == "warning" else "error"
        f.kind, f.space, f.address = f"{what} hazard", space.strip("_"), addr
        if m.group(5):
            f.block = [int(m.group(i)) for i in (5, 6, 7)]
        return f
    m = _API.match(head)
    if m:
        # a host API call that returned an error: not a device memory access (cuda-python probes
        # cuGetProcAddress for driver symbols at import; a failed launch fails the case itself)
        f.severity = "api"
        f.kind = f"api {m.group(1)}" + (f" in {m.group(4)}" if m.group(4) else "")
        f.address_note = m.group(3)
        return f
    low = head.lower()
    f.severity = "warning" if low.startswith("warning") else "error" if ("error" in low or "invalid" in low) else "note"
    return f


def _split_at(text: str) -> tuple[str, str | None]:
    m = re.match(r"^(.+?)\s+in\s+(.+)$", text)
    return (m.group(1), m.group(2)) if m else (text, None)


def _continue(f: SanitizerFinding, line: str) -> None:
    s = line.strip()
    m = _AT.match(s)
    if m and f.kernel is None:
        f.kernel, f.location = _kernel_of(m.group(1), m.group(2))
        return
    m = _THREAD.search(s)
    if m:
        f.thread = [int(m.group(i)) for i in (1, 2, 3)]
        f.block = [int(m.group(i)) for i in (4, 5, 6)]
        return
    m = _ADDR.match(s)
    if m:
        f.address, f.address_note = m.group(1), m.group(2)
        return
    m = _NEAR.search(s)
    if m:
        f.nearest_allocation = f"{m.group(1).replace(',', '')} bytes {m.group(2)} the nearest allocation at " \
                               f"{m.group(3)} of size {m.group(4).replace(',', '')} bytes"
        return
    m = _INSIDE.search(s)
    if m:
        f.nearest_allocation = f"inside the nearest allocation at {m.group(1)} of size {m.group(2).replace(',', '')} bytes"
        return
    m = _AND_ACCESS.match(s)
    if m and f.kind.startswith("race"):
        f.kind += f"/{m.group(1)}"
        if m.group(3):
            f.hazards = int(m.group(3))
        return
    m = _HAZ_THREAD.match(s)
    if m:
        if f.thread is None:
            f.thread = [int(m.group(i)) for i in (2, 3, 4)]
        if f.kernel is None:
            loc, src = _split_at(m.group(5))
            f.kernel, f.location = _kernel_of(loc, src)
            if f.kernel is None or re.fullmatch(r"0x[0-9a-fA-F]+", f.kernel or ""):
                f.kernel, f.location = _kernel_of("0x0", m.group(5).split(" in ", 1)[-1])


def parse_buffers(text: str) -> list[dict]:
    """The ``GDNCHECK-BUFFER {json}`` lines of a child's output, in order."""
    out = []
    for line in text.splitlines():
        i = line.find(BUFFER_TAG)
        if i >= 0:
            try:
                out.append(json.loads(line[i + len(BUFFER_TAG):]))
            except json.JSONDecodeError:
                continue
    return out


def locate(address: str | int, buffers: list[dict]) -> str | None:
    """``address`` relative to the named buffers (the last announced wins where addresses were
    reused): inside one (byte offset, element, pool row), in its red zone, or the nearest one."""
    a = int(address, 16) if isinstance(address, str) else int(address)
    best: tuple[int, str] | None = None
    for b in reversed(buffers):
        lo, hi, alo, ahi = b["lo"], b["hi"], b.get("alloc_lo", b["lo"]), b.get("alloc_hi", b["hi"])
        name, es, rb = b["name"], b.get("itemsize", 1), b.get("row_bytes", 0)
        if lo <= a < hi:
            off = a - lo
            row = f", row {off // rb}" if rb else ""
            return f"{name} + {off} bytes (element {off // es}{row})"
        if alo <= a < lo:
            return f"{name}: before guard, {lo - a} bytes before its first element (red zone)"
        if hi <= a < ahi:
            row = f", row +{(a - hi) // rb}" if rb else ""
            return f"{name}: after guard, {a - hi} bytes past its end{row} (red zone)"
        d, where = (a - hi, "past the end of") if a >= hi else (lo - a, "before the start of")
        if best is None or d < best[0]:
            best = (d, f"{d} bytes {where} {name} (nearest named buffer)")
    return best[1] if best else None


def parse_report(text: str, tool: str = "memcheck", buffers: list[dict] | None = None) -> SanitizerReport:
    """compute-sanitizer's text output (program output interleaved is ignored) -> report.

    ``buffers``: address ranges to map addresses onto (default: the ``GDNCHECK-BUFFER`` lines
    in ``text``)."""
    buffers = parse_buffers(text) if buffers is None else buffers
    findings: list[SanitizerFinding] = []
    cur: SanitizerFinding | None = None
    lines: list[str] = []
    in_host = False
    summary, counted, warned = "", None, None

    def close() -> None:
        nonlocal cur
        if cur is not None:
            cur.text = "\n".join(lines)[:2000]
            findings.append(cur)
        cur = None

    for raw in text.splitlines():
        m = _PREFIX.match(raw)
        if not m:
            continue
        body = m.group(1).rstrip()
        if not body.strip():
            continue
        indented = body[:1].isspace()
        s = body.strip()
        sm, rm = _ERR_SUMMARY.search(s), _RACE_SUMMARY.search(s)
        if sm and "not printed" in s:  # "N errors were not printed": the count follows on its own line
            close()
            continue
        if sm or rm:
            close()
            summary = s
            if sm:
                counted = int(sm.group(1))
            if rm:
                counted, warned = int(rm.group(1)), int(rm.group(2))
            continue
        if not indented:
            close()
            if _SKIP.match(s):
                continue
            cur, lines, in_host = _new_finding(s), [s], False
            continue
        if cur is None:
            continue
        if s.startswith("Saved host backtrace") or s.startswith("Host Frame"):
            in_host = True
            continue
        if in_host and not s.startswith(("Device Frame", "by thread", "Address", "and ")):
            continue  # host frame continuation lines
        in_host = False
        lines.append(s)
        _continue(cur, s)
    close()
    for f in findings:
        if f.address and buffers:
            f.buffer = locate(f.address, buffers)
        if f.nearest_allocation and buffers and not f.buffer:
            m = re.search(r"at (0x[0-9a-fA-F]+)", f.nearest_allocation)
            if m:
                f.buffer = locate(m.group(1), buffers)
    errors = sum(f.severity == "error" for f in findings)
    api = sum(f.severity == "api" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    # the tool's count includes API errors; the memory, race and initialisation errors are the rest
    return SanitizerReport(tool=tool, errors=max(errors, (counted or 0) - api), api_errors=api,
                           warnings=max(warnings, warned or 0), summary=summary,
                           findings=findings[:MAX_FINDINGS], dropped=max(0, len(findings) - MAX_FINDINGS))


# ---------------------------------------------------------------- one case under the tool

def command(exe: str, tool: str, args: list[str]) -> list[str]:
    """The sanitizer command line for the child ``args`` (extra tool options from
    ``$GDNCHECK_SANITIZER_ARGS``, e.g. ``--kernel-name kns=gdn``)."""
    extra = shlex.split(os.environ.get("GDNCHECK_SANITIZER_ARGS", ""))
    return [exe, "--tool", tool, "--print-limit", "200", *extra, sys.executable, "-m", "gdncheck.sanitize",
            "child", *args]


def sanitize_case(spec: str, case, tool: str, *, device: str = "cuda", exe: str | None = None,
                  log_dir: Path | None = None, timeout_s: float = TIMEOUT_S) -> CaseResult:
    """Run backend ``spec`` on ``case`` in a child process under ``compute-sanitizer --tool tool``;
    the child's result with the parsed report attached. Never raises for what the child does."""
    from gdncheck.backends import load_backend
    from gdncheck.execute import _base

    exe = exe or require(tool)
    backend = load_backend(spec)
    with tempfile.TemporaryDirectory(prefix="gdncheck-san-") as tmp:
        cpath, rpath = Path(tmp) / "case.json", Path(tmp) / "result.json"
        cpath.write_text(case.model_dump_json())
        cmd = command(exe, tool, ["--backend", spec, "--case", str(cpath), "--device", device, "--result", str(rpath)])
        env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "GDNCHECK_REDZONE_ANNOUNCE": "1"}
        t0 = time.perf_counter()
        # its own session: a timeout (or the runner stopping) kills the tool and its child, nothing else
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, start_new_session=True)
        _LIVE.add(proc.pid)
        try:
            text, _ = proc.communicate(timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            _kill(proc.pid)
            text, _ = proc.communicate()
            code = None
        finally:
            _LIVE.discard(proc.pid)
        wall = time.perf_counter() - t0
        res = None
        if rpath.exists():
            try:
                res = CaseResult.model_validate_json(rpath.read_text())
            except ValueError:
                res = None
    rep = parse_report(text, tool)
    if not rep.summary:  # the tool did not finish its report: no verdict is not a pass
        rep.findings.append(SanitizerFinding(
            severity="error", kind=f"no summary from compute-sanitizer (exit {code}): the tool did not finish",
            text=text[-1500:]))
        rep.errors += 1
    rep.command = " ".join(shlex.quote(c) for c in cmd[:cmd.index(sys.executable)]) + " python -m gdncheck.sanitize child ..."
    rep.exit_code = code
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{backend.name}-{case.id}-{tool}.log"
        log.write_text(text)
        rep.log = str(log)
    if res is None:
        base = _base(backend, case, _dev(device), "", spec)
        why = (f"sanitizer timed out after {timeout_s:.0f} s" if code is None
               else f"child under compute-sanitizer exited {code} without a result")
        res = CaseResult(status="crash" if code is not None else "error", reason=f"{why}: {text[-1500:]}", **base)
    res.sanitizer = rep
    res.repro = f"{case.repro(spec)} --sanitize {tool}"
    res.timing.wall_s = wall
    return res


_LIVE: set[int] = set()  # process groups of the sanitizer sessions running now
_STOP = threading.Event()


def _kill(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop_on_signal(signum, frame) -> None:
    """SIGTERM / SIGINT while pairs run: kill the running sessions (they are not in our process
    group, so the signal did not reach them), record nothing more, and stop; --resume redoes them."""
    _STOP.set()
    for pgid in list(_LIVE):
        _kill(pgid)
    raise KeyboardInterrupt(f"signal {signum}")


def _dev(device: str):
    import torch
    return torch.device(device)


def child_main(argv: list[str]) -> int:
    """``python -m gdncheck.sanitize child --backend S --case FILE --device D --result FILE``: run
    the case once (announcing its buffers) and write the CaseResult JSON."""
    import argparse

    p = argparse.ArgumentParser(prog="gdncheck.sanitize child")
    p.add_argument("--backend", required=True)
    p.add_argument("--case", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    os.environ["GDNCHECK_REDZONE_ANNOUNCE"] = "1"
    from gdncheck.backends import load_backend
    from gdncheck.data.case import Case
    from gdncheck.execute import run_case

    case = Case.model_validate_json(Path(a.case).read_text())
    res = run_case(load_backend(a.backend), case, device=a.device, twin=None, worker=f"sanitize-pid{os.getpid()}",
                   spec=a.backend)
    Path(a.result).write_text(res.model_dump_json())
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------- suites

def run_pairs(pairs: list, spec_of: dict[str, str], tool: str, record, *, device: str = "cuda", jobs: int = 1,
              timeout_s: float = TIMEOUT_S, log_dir: Path | None = None) -> None:
    """Every (backend, case) pair under the sanitizer, ``jobs`` processes at a time; ``record(b, c,
    result)`` keeps each result (the run workflow streams it to its results file). Whole reports go
    to ``log_dir``. Cases of tens of GiB run one at a time after the others: the sanitizer's
    processes share the device without the runner's memory admission. SIGTERM / SIGINT kill the
    running sessions and record nothing half-done (``--resume`` redoes them)."""
    from gdncheck.execute import case_bytes

    exe = require(tool)

    def one(b, c) -> None:
        if _STOP.is_set():
            return
        res = sanitize_case(spec_of[b.name], c, tool, device=device, exe=exe, log_dir=log_dir, timeout_s=timeout_s)
        if not _STOP.is_set():  # a session killed by a stop is not a result
            record(b, c, res)

    big = [(b, c) for b, c in pairs if case_bytes(c) > BIG_CASE_BYTES]
    main = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    _STOP.clear()
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
            for fut in [ex.submit(one, b, c) for b, c in pairs if (b, c) not in big]:
                fut.result()
        for b, c in big:
            one(b, c)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(f"usage: python -m gdncheck.sanitize child --backend S --case FILE --device D --result FILE")
