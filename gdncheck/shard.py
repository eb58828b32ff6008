"""Scale-out by compiled kernel: compile units, a fitted cost model, and shards of whole units.

A *compile unit* is every (backend, case) pair that reuses one compiled (and autotuned) kernel:
one backend's cases of one :func:`gdncheck.run.schedule_key`, or, where several backends call
the same kernels (a backend's ``kernel_group``, e.g. FlashInfer prefill's automatic route and
its two forced routes), those backends' cases of one key together. A shard runs whole units, so
each kernel compiles on one shard only; hashing single pairs made every shard compile nearly
every kernel (two H200s were slower than one).

Units are balanced over shards by a cost model fitted to measured runs (``costs.toml`` beside
this module; ``python scripts/shard_costs.py fit RESULTS.jsonl...`` refreshes it): per backend, the
first compile of a unit, each further autotune key in it, each flag variant, and seconds per
case (a constant plus a term per GiB the case holds). Assignment is longest-processing-time first
with ties broken by the units' keys. It reads only the suites, the backends' declared keys and
capabilities and the cost file, never what is installed or which GPU is present, so every shard
process (on any host) computes the same split.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Iterable, Sequence

COSTS_PATH = Path(__file__).with_name("costs.toml")

Pair = tuple  # (Backend, Case)


# ---------------------------------------------------------------- compile units

def unit_key(backend, case) -> str:
    """Key of the compile unit of ``(backend, case)``: equal keys share compiled kernels.

    ``backend.kernel_group`` (optional) names kernels that several backends share; otherwise the
    backend's name. The rest is the backend's schedule key (``run.schedule_key``).
    """
    group = getattr(backend, "kernel_group", None) or backend.name
    return repr((group, *backend.schedule_key(case)))


def _compile_key(backend, case) -> str:
    return repr((backend.name, *backend.compile_key(case)))


def _tune_key(backend, case) -> str:
    """Key of the expensive part of a compile (``backend.autotune_key``, optional; else the
    compile key): compile keys that share it build in seconds once it is done in the process
    (FLA: flag variants of one shape and op reuse its autotuning)."""
    # Backends of one kernel group share builds: their cases of one key are one autotune key, so
    # split_for_lanes never separates them (FlashInfer prefill's automatic and forced routes).
    group = getattr(backend, "kernel_group", None) or backend.name
    fn = getattr(backend, "autotune_key", None)
    try:
        return repr((group, *(fn(case) if fn is not None else backend.compile_key(case))))
    except Exception:  # noqa: BLE001 - a plugin's hint must not stop the run
        return repr((group, *backend.compile_key(case)))


def declared_unsupported(backend, case) -> bool:
    """True when the backend's declared limits rule the pair out (it then costs no device time)."""
    try:
        return backend.supports(case) is not None
    except Exception:  # noqa: BLE001 - a plugin's supports() that raises: its worker reports it
        return False


@dataclass
class Unit:
    """Pairs that share compiled kernels, in plan order, with the key that names them."""

    key: str
    pairs: list = field(default_factory=list)
    cost: float = 0.0


def units_of(pairs: Sequence[Pair]) -> list[Unit]:
    """``pairs`` grouped by :func:`unit_key`, in order of first appearance."""
    units: dict[str, Unit] = {}
    for b, c in pairs:
        k = unit_key(b, c)
        units.setdefault(k, Unit(k)).pairs.append((b, c))
    return list(units.values())


# ---------------------------------------------------------------- cost model

@dataclass(frozen=True)
class Cost:
    """Seconds one backend spends: the first compile of a unit, each further autotune key in the
    unit (FLA: the other op's kernels), each further compile key of an autotune key already done
    (flag variants), and per case ``case_s + gib_s * GiB`` (materialize, warm-up, kernel, oracle,
    twin)."""

    unit_compile_s: float
    key_compile_s: float
    case_s: float
    gib_s: float = 0.0
    variant_compile_s: float = 0.0


# Without a fitted entry: the backend's own compile hint, and 0.3 s per case.
_FALLBACK_CASE_S = 0.3


class Costs:
    """Cost entries by backend name, then family, then a default built from the compile hint."""

    def __init__(self, backends: dict[str, Cost] | None = None, families: dict[str, Cost] | None = None):
        self.backends = dict(backends or {})
        self.families = dict(families or {})

    def for_backend(self, b) -> Cost:
        if b.name in self.backends:
            return self.backends[b.name]
        if getattr(b, "family", None) in self.families:
            return self.families[b.family]
        hint = float(getattr(b, "compile_hint_s", 0.0) or 0.0)
        return Cost(hint, hint / 2, _FALLBACK_CASE_S, 0.0, hint / 2)

    def case_cost(self, b, c) -> float:
        """Seconds of one case once its kernels are compiled."""
        from gdncheck.execute import case_bytes

        m = self.for_backend(b)
        return 0.0 if declared_unsupported(b, c) else m.case_s + m.gib_s * case_bytes(c) / 2**30

    def unit_cost(self, pairs: Sequence[Pair]) -> float:
        """Predicted seconds of one unit in one worker; declared-unsupported pairs cost nothing."""
        from gdncheck.execute import case_bytes

        keys: dict[str, set] = {}
        tunes: dict[str, set] = {}
        total = 0.0
        for b, c in pairs:
            if declared_unsupported(b, c):
                continue
            m = self.for_backend(b)
            total += m.case_s + m.gib_s * case_bytes(c) / 2**30
            keys.setdefault(b.name, set()).add(_compile_key(b, c))
            tunes.setdefault(b.name, set()).add(_tune_key(b, c))
        for name, ks in keys.items():
            m = self.for_backend(next(b for b, _ in pairs if b.name == name))
            nt = len(tunes[name])
            total += m.unit_compile_s + m.key_compile_s * (nt - 1) + m.variant_compile_s * (len(ks) - nt)
        return total


def load_costs(path: str | Path | None = None) -> Costs:
    """The cost model in ``path`` (default: the shipped ``costs.toml``); a missing file gives the
    fallbacks only (compile hints), so a plugin-only install still shards deterministically."""
    p = Path(path) if path is not None else COSTS_PATH
    if not p.exists():
        return Costs()
    data = tomllib.loads(p.read_text())

    def table(d: dict) -> dict[str, Cost]:
        return {k: Cost(float(v["unit_compile_s"]), float(v["key_compile_s"]), float(v["case_s"]),
                        float(v.get("gib_s", 0.0)), float(v.get("variant_compile_s", 0.0))) for k, v in d.items()}

    return Costs(table(data.get("backend", {})), table(data.get("family", {})))


# ---------------------------------------------------------------- assignment

def assign(units: Sequence[Unit], n: int) -> list[list[Unit]]:
    """Units over ``n`` shards, longest-processing-time first: each unit, biggest first (ties by
    key), goes to the least-loaded shard (ties to the lowest index). Deterministic."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shards: list[list[Unit]] = [[] for _ in range(n)]
    load = [0.0] * n
    for u in sorted(units, key=lambda u: (-u.cost, u.key)):
        i = min(range(n), key=lambda j: (load[j], j))
        shards[i].append(u)
        load[i] += u.cost
    return shards


def run_order(units: Sequence[Unit]) -> list[Unit]:
    """The order a shard (or a run's lanes) should start its units: biggest first, ties by key,
    so the longest compiles start at once and no worker is left alone with one at the end."""
    return sorted(units, key=lambda u: (-u.cost, u.key))


def split_for_lanes(units: Sequence[Unit], lanes: int, costs: Costs | None = None) -> list[Unit]:
    """Units for ``lanes`` parallel workers: while the biggest unit alone outlasts the lanes'
    mean load (it would bound the run's wall while other lanes idle), split it along its
    autotune keys (FLA: prefill apart from the other ops). Each part pays its own first compile,
    so a throughput-bound run (the full tier) keeps its units whole and a latency-bound one (the
    smoke tier: 11 shape-ops on 12 lanes) runs its autotunes side by side. Deterministic."""
    costs = costs or load_costs()
    units = list(units)
    if lanes <= 1:
        return units
    while True:
        mean = sum(u.cost for u in units) / lanes
        big = [u for u in units if u.cost > mean and len(_tunes(u)) > 1]
        if not big:
            return units
        u = max(big, key=lambda u: (u.cost, u.key))
        parts: dict[str, Unit] = {}
        first = _tunes(u)[0]
        for b, c in u.pairs:  # declared-unsupported pairs go with the first part: they cost nothing
            t = first if declared_unsupported(b, c) else _tune_key(b, c)
            parts.setdefault(t, Unit(f"{u.key}|{t}")).pairs.append((b, c))
        for p in parts.values():
            p.cost = costs.unit_cost(p.pairs)
        i = units.index(u)
        units[i:i + 1] = list(parts.values())


def _tunes(u: Unit) -> list[str]:
    """Autotune keys of a unit's pairs that run, in order of first appearance."""
    return list(dict.fromkeys(_tune_key(b, c) for b, c in u.pairs if not declared_unsupported(b, c)))


def lanes_wall(units: Sequence[Unit], jobs: int) -> float:
    """Predicted span of ``units`` on ``jobs`` lanes: started biggest first, each on the lane that
    frees first (how :func:`gdncheck.run.schedule` and its lanes proceed), compile locks aside."""
    lanes = [0.0] * max(1, jobs)
    for u in run_order(units):
        i = min(range(len(lanes)), key=lambda j: (lanes[j], j))
        lanes[i] += u.cost
    return max(lanes)


def plan_units(pairs: Sequence[Pair], costs: Costs | None = None) -> list[Unit]:
    """Units of ``pairs`` with their predicted costs."""
    costs = costs or load_costs()
    units = units_of(pairs)
    for u in units:
        u.cost = costs.unit_cost(u.pairs)
    return units


def select(pairs: Sequence[Pair], shard: tuple[int, int], costs: Costs | None = None) -> list[Pair]:
    """The pairs of shard ``i`` of ``n`` (``shard = (i, n)``): whole compile units, balanced by the
    cost model; the pairs keep their order in ``pairs``."""
    i, n = shard
    mine = {u.key for u in assign(plan_units(pairs, costs), n)[i]}
    return [(b, c) for b, c in pairs if unit_key(b, c) in mine]


def hash_shard(case_id: str, backend_name: str, n: int) -> int:
    """Shard of a pair under the former hash split (kept to predict what it would recompile)."""
    h = hashlib.sha256(f"{case_id}:{backend_name}".encode()).hexdigest()
    return int(h[:8], 16) % n


# ---------------------------------------------------------------- shared kernel caches

def shared_cache_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the shard processes of one host: every on-disk kernel cache named
    explicitly, the same for all, so a kernel one shard compiled is loaded by the others.

    - ``TRITON_CACHE_DIR``: Triton's binaries, and with ``TRITON_CACHE_AUTOTUNING=1`` (FLA's
      ``FLA_CACHE_RESULTS``) the autotuning choices of FLA's chunk kernels.
    - ``FLASHINFER_WORKSPACE_BASE``: FlashInfer's JIT cache (``<base>/.cache/flashinfer``),
      where its CuTe DSL decode/MTP kernels are exported and reloaded.
    - ``CUTE_DSL_CACHE_DIR``: the CuTe DSL's own file cache of ``@cute.jit`` calls.

    Values already set are kept (a CI job that points them at a persisted directory).
    """
    env = dict(os.environ if environ is None else environ)
    home = Path(env.get("HOME") or Path.home())
    tmp = Path(env.get("TMPDIR") or "/tmp")
    user = env.get("USER") or env.get("LOGNAME") or str(os.getuid() if hasattr(os, "getuid") else "user")
    env.setdefault("TRITON_CACHE_DIR", str(home / ".triton" / "cache"))
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    env.setdefault("FLA_CACHE_RESULTS", "1")
    env.setdefault("FLASHINFER_WORKSPACE_BASE", str(home))
    env.setdefault("CUTE_DSL_CACHE_DIR", str(tmp / user / "cutlass_python_cache"))
    return env


# ---------------------------------------------------------------- fitting the cost model

def _result_rows(paths: Iterable[str | Path]):
    """(backend, case, timing dict, unit key, compile key, worker) of every result that ran."""
    from gdncheck.backends import load_backend
    from gdncheck.data.case import Case
    from gdncheck.data.io import read_lines

    loaded: dict[str, object] = {}
    for p in paths:
        for line in read_lines(p)[1:]:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if d.get("status") in (None, "unsupported") or "case" not in d:
                continue
            name = d["backend"]
            if name not in loaded:
                try:
                    loaded[name] = load_backend(name)
                except Exception:  # noqa: BLE001 - a backend not installed here: its rows are skipped
                    loaded[name] = None
            b = loaded[name]
            if b is None:
                continue
            c = Case.model_validate(d["case"])
            yield b, c, d.get("timing") or {}, unit_key(b, c), _compile_key(b, c), _tune_key(b, c)


def fit(paths: Sequence[str | Path]) -> dict[str, dict[str, float]]:
    """Cost entries per backend from results files (``timing.compile_s`` / ``wall_s``).

    Within each file, by start time, a unit's first recorded compile is its first compile, a
    compile of an autotune key new to the unit a further key, and any other a variant. Medians,
    so one contended outlier does not set the model. Per case: ``wall_s - compile_s``, fitted as
    ``case_s + gib_s * GiB`` by least squares (both >= 0).
    """
    from gdncheck.execute import case_bytes

    firsts: dict[str, list[float]] = {}
    further: dict[str, list[float]] = {}
    variants: dict[str, list[float]] = {}
    xs: dict[str, list[tuple[float, float]]] = {}
    for p in paths:
        seen_units: set[tuple] = set()
        seen_tunes: set[str] = set()
        rows = sorted(_result_rows([p]), key=lambda r: (r[2].get("start_s") or 0.0))
        for b, c, t, uk, ck, tk in rows:
            comp = t.get("compile_s")
            if comp is not None:
                if (b.name, uk) not in seen_units:
                    firsts.setdefault(b.name, []).append(comp)
                elif tk not in seen_tunes:
                    further.setdefault(b.name, []).append(comp)
                else:
                    variants.setdefault(b.name, []).append(comp)
                seen_units.add((b.name, uk))
                seen_tunes.add(tk)
            if t.get("wall_s") is not None:
                xs.setdefault(b.name, []).append((case_bytes(c) / 2**30, t["wall_s"] - (comp or 0.0)))
    out: dict[str, dict[str, float]] = {}
    for name in sorted(set(firsts) | set(xs)):
        f, k, v = firsts.get(name, []), further.get(name, []), variants.get(name, [])
        a, g = _line(xs.get(name, []))
        first = median(f) if f else 0.0
        out[name] = {"unit_compile_s": round(first, 2),
                     "key_compile_s": round(median(k), 2) if k else round(first, 2),
                     "variant_compile_s": round(median(v), 2) if v else 0.0,
                     "case_s": round(a, 3), "gib_s": round(g, 4),
                     "n_units": len(f), "n_keys": len(k), "n_variants": len(v), "n_cases": len(xs.get(name, []))}
    return out


def _line(pts: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + g x`` with ``a, g >= 0`` (a mean when x does not vary)."""
    if not pts:
        return _FALLBACK_CASE_S, 0.0
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    g = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 1e-12 else 0.0
    g = max(g, 0.0)
    a = max(my - g * mx, 0.0)
    return a, g


def write_costs(entries: dict[str, dict[str, float]], sources: Sequence[str], path: str | Path = COSTS_PATH) -> None:
    """Write ``entries`` (from :func:`fit`) as the cost model TOML, with per-family medians."""
    from gdncheck.backends import load_backend

    fam: dict[str, list[dict]] = {}
    for name, e in entries.items():
        try:
            fam.setdefault(load_backend(name).family, []).append(e)
        except Exception:  # noqa: BLE001 - unknown here: no family entry
            pass
    lines = ["# Cost model for compile-unit sharding (gdncheck/shard.py): seconds per backend, fitted",
             "# from measured results files. Refresh: python scripts/shard_costs.py fit RESULTS.jsonl... ",
             "# unit_compile_s: first compile of a unit; key_compile_s: each further autotune key in it;",
             "# variant_compile_s: each further compile key of an autotune key done; per case:",
             "# case_s + gib_s * GiB (case_bytes). Families: medians of their backends.",
             "# Sources: " + ", ".join(sources), ""]
    for title, table in (("backend", entries),
                         ("family", {f: {k: round(median(e[k] for e in es), 3)
                                         for k in ("unit_compile_s", "key_compile_s", "variant_compile_s", "case_s", "gib_s")}
                                     for f, es in sorted(fam.items())})):
        for name, e in table.items():
            lines.append(f'[{title}."{name}"]')
            lines += [f"{k} = {v}" for k, v in e.items()]
            lines.append("")
    Path(path).write_text("\n".join(lines))


# ---------------------------------------------------------------- lanes within one run

def schedule(pairs: list[tuple[Backend, Case]], lanes: int = 1) -> list[list[tuple[Backend, Case]]]:
    """Pairs in work units for parallel lanes, in start order.

    A unit is a compile unit (:func:`gdncheck.shard.unit_key`: one backend's cases of one
    :meth:`Backend.schedule_key`, or several backends' that share kernels), compiled once in one
    process. Longest units start first, by the fitted cost model (``gdncheck/costs.toml``). With
    ``lanes`` workers, a unit that alone would outlast the others is split along its autotune
    keys (:func:`gdncheck.shard.split_for_lanes`).
    """
    units = split_for_lanes(plan_units(pairs), lanes)
    # Units whose builds serialise on a lock form a chain that one lane works through from the
    # start (:func:`gdncheck.execute.run_units` gives a lock to one lane at a time), so they lead the order.
    order = [u.pairs for u in sorted(units, key=lambda u: (unit_lock(u.pairs) is None, -u.cost, u.key))]
    # The first ``lanes`` units start at once, one per lane (each lane preloads its unit's
    # backends): at most one unit of each lock among them; the rest keep their order.
    first, rest, locks = [], [], set()
    for u in order:
        name = unit_lock(u)
        if len(first) < lanes and (name is None or name not in locks):
            first.append(u)
            locks.add(name)
        else:
            rest.append(u)
    return first + rest


def unit_lock(unit: list[tuple[Backend, Case]]) -> str | None:
    """The compile lock of a unit's kernels (:meth:`Backend.compile_lock` of its first case)."""
    b, c = unit[0]
    try:
        return b.compile_lock(c)
    except Exception:  # noqa: BLE001 - a plugin's hint must not stop the run
        return None
