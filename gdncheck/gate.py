"""``gdncheck gate``: the pre-merge precision gate over a tier of suites x backends.

It runs the tier (:func:`gdncheck.run.run`; on several GPUs one shard per GPU, merged), or takes a
results file, and hands the results to the one judge (:func:`gdncheck.judge.judge_run`) with the
budgets, the run's plan, a baseline and the required backends. The kill table proves the judge:
every planted fault must fail, the clean twin must pass every seed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from gdncheck.budgets import Budgets
from gdncheck.data.errors import EnvironmentProblem, Exit, UsageError
from gdncheck.data.io import load_results, merge_results, write_results
from gdncheck.data.verdict import Finding, Verdict
from gdncheck.execute import run_case
from gdncheck.judge import REGRESS_FACTOR, judge_result, judge_run
from gdncheck.progress import Progress
from gdncheck.run import reseed

# Tiers: suites run on every push (smoke), nightly / before merge (full), under compute-sanitizer (sanitize).
# sanitize: the cases most likely to expose memory bugs, to run under ``--sanitize`` (cases/sanitize*.toml).
TIERS: dict[str, list[str]] = {"smoke": ["smoke"], "full": ["smoke", "models", "edges", "findings"],
                               "sanitize": ["sanitize", "sanitize_large"]}


@dataclass
class GateOutcome:
    verdict: Verdict
    results: Path
    wall_s: float | None


def gate(suites: list[str], specs: list[str], budgets: Budgets, out: Path, *, baseline: Path | None = None,
         factor: float = REGRESS_FACTOR, min_overlap: float = 0.5, shard: tuple[int, int] | None = None,
         gpus: str = "auto", jobs: int = 1, device: str = "cpu", require: list[str] = (),
         results: Path | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
         allow_empty: bool = False, seeds: int = 1, judge: bool = True, sanitize: str | None = None) -> GateOutcome:
    """Run (or load) the tier and judge it. Configuration problems raise before any work."""
    from gdncheck.backends import load_backend
    from gdncheck.run import RESULTS, check_device, plan, run

    if factor <= 1.0:
        raise UsageError(f"--regress-factor must be > 1, got {factor}")
    if not 0.0 <= min_overlap <= 1.0:
        raise UsageError(f"--min-overlap must be in [0, 1], got {min_overlap}")
    base_results = base_env = None
    if baseline is not None:
        bh, base_results = load_results(baseline)
        base_env = bh.environment.model_dump(exclude_none=True, include={"gpu", "flashinfer", "fla", "torch", "git_rev"})
    wall = None
    if results is not None:
        header, res = load_results(results)
        res_path = results
    else:
        check_device(device)
        backends = [load_backend(s) for s in dict.fromkeys(list(specs) + list(require))]
        for s, b in zip(dict.fromkeys(list(specs) + list(require)), backends):
            if s in require:
                why = b.available()
                if why:
                    raise EnvironmentProblem(f"required backend {s!r} is unavailable: {why}")
                if b.caps.device == "cuda" and not device.startswith("cuda"):
                    raise EnvironmentProblem(f"required backend {s!r} needs a GPU, the gate runs on {device}")
        specs = list(dict.fromkeys(list(specs) + list(require)))
        n = gpu_count(gpus, device) if shard is None else 1
        t0 = time.perf_counter()
        if n > 1:
            out.mkdir(parents=True, exist_ok=True)
            gpu_ids = visible_gpus()
            argv = sum((["--suite", s] for s in suites), []) + sum((["--backend", b] for b in specs), [])
            argv += sum((["--budgets", str(p)] for p in budgets.files[1:]), []) + ["--device", "cuda"]
            argv += ["--jobs", str(jobs), "--seeds", str(seeds)] + (["--sanitize", sanitize] if sanitize else [])
            print(f"gate: {n} shards on GPUs {gpu_ids[:n]}", file=sys.stderr)
            res_path = out / RESULTS
            header, res = merge_results(fan_out(argv, n, gpu_ids, out))
            write_results(res_path, header, res)
        else:
            outcome = run(suites, specs, out, device=device, resume=resume, overwrite=overwrite, shard=shard,
                          progress=progress, jobs=jobs, seeds=seeds, budgets=budgets, sanitize=sanitize)
            res_path = outcome.dir.results
            header, res = load_results(res_path)
        wall = time.perf_counter() - t0
        print(f"gate: {len(header.planned or [])} pairs planned, ran in {wall:.1f} s ({jobs} job"
              f"{'s' * (jobs > 1)}) -> {res_path}", file=sys.stderr)
    if not judge:
        return GateOutcome(Verdict(exit_code=0), res_path, wall)
    v = judge_run(res, budgets, planned=header.planned, shards=header.shards, require=require,
                  baseline=base_results, baseline_path=str(baseline) if baseline else None, baseline_env=base_env,
                  factor=factor, min_overlap=min_overlap, allow_empty=allow_empty)
    return GateOutcome(v, res_path, wall)


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


def fan_out(argv: list[str], n: int, gpus: list[str], out: Path) -> list[Path]:
    """Run ``gdncheck gate --shard i/n`` once per GPU (``CUDA_VISIBLE_DEVICES`` = that GPU), in
    parallel; returns the shard results files. Raises on a child's config/env exit.

    Shards are whole compile units (:mod:`gdncheck.shard`) and share the host's on-disk kernel
    caches (:func:`gdncheck.shard.shared_cache_env`): no kernel is compiled on two GPUs."""
    from gdncheck.shard import shared_cache_env

    base_env = shared_cache_env()
    procs = []
    for i in range(n):
        sub = out / f"shard-{i}"
        sub.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "gdncheck", "gate", *argv, "--shard", f"{i}/{n}", "--gpus", "1",
               "--out", str(sub), "--no-judge", "--no-progress", "--overwrite"]
        env = {**base_env, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}
        log = (sub / "gate.log").open("w")
        procs.append((i, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log, sub))
    codes = {}
    for i, p, log, sub in procs:
        codes[i] = p.wait()
        log.close()
    for want, exc in ((Exit.USAGE, UsageError), (Exit.ENVIRONMENT, EnvironmentProblem)):
        bad = [i for i, c in codes.items() if c == want]
        if bad:
            tail = (out / f"shard-{bad[0]}" / "gate.log").read_text().strip().splitlines()[-1:]
            raise exc(f"shard {bad[0]}/{n} exited {int(want)}: {' '.join(tail)}")
    dead = [i for i, c in codes.items() if c not in (Exit.PASS, Exit.FAIL)]
    if dead:
        raise EnvironmentProblem(f"shard process(es) {dead} died (exit {[codes[i] for i in dead]}); "
                                 f"logs in {out}/shard-*/gate.log")
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


def judge_fault(backend, cases, budgets: Budgets, *, as_backend: str, device: str = "cpu",
                stop_at_kill: bool = False) -> tuple[int, list[Finding]]:
    """Run ``backend`` on ``cases`` (no twin) and judge each as ``as_backend``: (cases failed, findings).
    ``stop_at_kill``: stop at the first failing case (enough to show a fault is caught)."""
    failed, found = 0, []
    for c in cases:
        f = judge_result(run_case(backend, c, device=device, twin=None), budgets, as_backend=as_backend)
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
    return [reseed(c, seed_index) for c in cases]


def kill_table(budgets: Budgets, *, seeds: int = 20, faults: Iterable[str] | None = None,
               device: str = "cpu", clean: bool = True, progress: bool = False) -> tuple[list[KillRow], KillRow | None, list[Finding]]:
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
        raise UsageError(f"unknown fault(s) {unknown}; known: {sorted(F.FAULTS)}")
    rows = []
    with Progress("kill table", len(names) + (seeds if clean else 0), enabled=progress) as bar:
        for name in names:
            failed, found = judge_fault(F.FAULTS[name](), cases, budgets, as_backend=clean_be.name, device=device)
            rows.append(KillRow(name, bool(found), len(cases), failed, sorted({f.check for f in found}),
                                found[0] if found else None))
            bar.advance(name)
        twin_row, alarms = None, []
        if clean:
            failed = 0
            for s in range(seeds):
                n, f = judge_fault(clean_be, reseeded(cases, s), budgets, as_backend=clean_be.name, device=device)
                failed += n
                alarms += f
                bar.advance(f"clean twin seed {s}")
        alarms.sort(key=lambda f: -f.severity)
        twin_row = KillRow(f"clean twin ({clean_be.name}) x {seeds} seeds", bool(alarms), seeds * len(cases),
                           failed, sorted({f.check for f in alarms}), alarms[0] if alarms else None)
    return rows, twin_row, alarms


def gpu_count(gpus: str, device: str) -> int:
    if device != "cuda":
        return 1  # cpu, or a pinned cuda:N
    if gpus == "auto":
        return max(1, len(visible_gpus()))
    try:
        n = int(gpus)
    except ValueError:
        raise UsageError(f"--gpus: expected 'auto' or a number, got {gpus!r}") from None
    if n < 1:
        raise UsageError(f"--gpus: need >= 1, got {n}")
    have = len(visible_gpus())
    if n > have:
        raise EnvironmentProblem(f"--gpus {n} but {have} GPU(s) visible")
    return n
