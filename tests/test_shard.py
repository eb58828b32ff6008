"""Compile-unit sharding: units, the cost model, balanced deterministic shards, merge = unsharded."""
import json
import random
from pathlib import Path

import pytest

from gdncheck import shard as S
from gdncheck.backends import default_backends, load_backend
from gdncheck.gate import TIERS
from gdncheck.data.io import load_results, merge_results
from gdncheck.run import plan
from gdncheck.run import run as _run_dir


def run(*a, **kw):
    return _run_dir(*a, **kw).dir.results

GPU_BACKENDS = [load_backend(s) for s in default_backends(gpu=True)]  # the classes load without CUDA


def _shards(suites, n, backends=GPU_BACKENDS):
    return [plan(suites, backends, (i, n)) for i in range(n)]


@pytest.mark.parametrize("suite", ["smoke", "models", "edges"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_each_compile_unit_on_one_shard_and_nothing_lost(suite, n):
    whole = plan([suite], GPU_BACKENDS)
    shards = _shards([suite], n)
    got = [(b.name, c.id) for s in shards for b, c in s]
    assert sorted(got) == sorted((b.name, c.id) for b, c in whole)  # each pair once
    assert len(set(got)) == len(got)
    where_unit: dict[str, set[int]] = {}
    where_key: dict[tuple, set[int]] = {}
    for i, s in enumerate(shards):
        for b, c in s:
            where_unit.setdefault(S.unit_key(b, c), set()).add(i)
            where_key.setdefault((b.name, b.compile_key(c)), set()).add(i)
    assert all(len(v) == 1 for v in where_unit.values())
    assert all(len(v) == 1 for v in where_key.values())  # each compiled kernel on one shard
    assert sum(1 for s in shards if s) >= min(n, 2)  # a real split


def test_backends_sharing_kernels_share_a_shard():
    """FlashInfer prefill's automatic route runs the forced routes' kernels; decode's fp32 verify
    runs the MTP kernel: those pairs of one case land on one shard; mtp-ssm's kernels are its own."""
    groups = ("flashinfer.prefill", "flashinfer.decode")
    where: dict[tuple, set[int]] = {}
    for i, s in enumerate(_shards(["smoke", "edges"], 4)):
        for b, c in s:
            g = getattr(b, "kernel_group", None)
            if g in groups and b.supports(c) is None:
                where.setdefault((g, c.id), set()).add(i)
    assert len(where) > 20 and all(len(v) == 1 for v in where.values())
    verify = [c for _, c in plan(["smoke"], [load_backend("flashinfer-mtp")]) if c.op == "verify"]
    dec, mtp, ssm = (load_backend(n) for n in ("flashinfer-decode", "flashinfer-mtp", "flashinfer-mtp-ssm"))
    assert all(S.unit_key(dec, c) == S.unit_key(mtp, c) != S.unit_key(ssm, c) for c in verify)
    pre = [load_backend(n) for n in ("flashinfer-prefill", "flashinfer-prefill-cp", "flashinfer-prefill-chunk")]
    c = next(c for _, c in plan(["smoke"], pre[:1]) if pre[0].supports(c) is None)
    assert len({S.unit_key(b, c) for b in pre}) == 1
    assert S.unit_key(load_backend("fla-chunk"), c) != S.unit_key(load_backend("fla-recurrent"), c)


def test_assignment_is_deterministic_and_independent_of_input_order():
    pairs = plan(TIERS["full"], GPU_BACKENDS)
    units = S.plan_units(pairs)
    want = [[u.key for u in s] for s in S.assign(units, 4)]
    for seed in (1, 2, 3):
        shuffled = list(units)
        random.Random(seed).shuffle(shuffled)
        assert [[u.key for u in s] for s in S.assign(shuffled, 4)] == want
    # the pairs a shard selects do not depend on the order of the plan either
    rev = list(reversed(pairs))
    for i in range(3):
        a = {(b.name, c.id) for b, c in S.select(pairs, (i, 3))}
        assert a == {(b.name, c.id) for b, c in S.select(rev, (i, 3))}


@pytest.mark.parametrize("n", [2, 4, 8])
def test_full_tier_balanced_by_the_cost_model(n):
    units = S.plan_units(plan(TIERS["full"], GPU_BACKENDS))
    loads = [sum(u.cost for u in s) for s in S.assign(units, n)]
    mean = sum(loads) / n
    assert max(loads) <= mean + max(u.cost for u in units)  # the LPT guarantee
    assert max(loads) / mean < 1.05
    # shards by hash would put most units on every shard; by unit, each unit on one
    assert sum(len(s) for s in S.assign(units, n)) == len(units)


def test_lpt_on_known_units():
    units = [S.Unit(k, cost=c) for k, c in (("a", 7.0), ("b", 5.0), ("c", 4.0), ("d", 3.0), ("e", 3.0))]
    shards = S.assign(units, 2)
    assert [[u.key for u in s] for s in shards] == [["a", "d"], ["b", "c", "e"]]
    assert [u.key for u in S.run_order(units[::-1])] == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError):
        S.assign(units, 0)


def test_cost_model_prices_compiles_once_per_key_and_skips_unsupported():
    chunk = load_backend("fla-chunk")
    fi = load_backend("flashinfer-decode")
    costs = S.Costs({"fla-chunk": S.Cost(80.0, 20.0, 1.0, 0.0, 2.0)})
    cases = [c for _, c in plan(["smoke"], [chunk]) if chunk.supports(c) is None]
    unit = [c for c in cases if S.unit_key(chunk, c) == S.unit_key(chunk, cases[0])]
    keys = {repr(chunk.compile_key(c)) for c in unit}
    tunes = {S._tune_key(chunk, c) for c in unit}
    assert len(keys) > len(tunes) > 1  # the smoke unit has both kinds of further compile
    want = 80 + 20 * (len(tunes) - 1) + 2 * (len(keys) - len(tunes)) + len(unit)
    assert costs.unit_cost([(chunk, c) for c in unit]) == pytest.approx(want)
    small = [c for _, c in plan(["smoke"], [fi]) if c.K == 32]
    assert small and costs.unit_cost([(fi, c) for c in small]) == 0.0  # declared unsupported: no worker time
    # without an entry: the backend's compile hint
    assert S.Costs().for_backend(chunk).unit_compile_s == chunk.compile_hint_s


def test_fit_recovers_a_synthetic_model(tmp_path):
    """Results written from a known model (first compile 60 s, further autotune keys 10 s, flag
    variants 1 s, 0.5 s per case plus 2 s per GiB) refit to it, and the TOML written loads back."""
    from gdncheck.execute import case_bytes

    chunk = load_backend("fla-chunk")
    cases = [c for _, c in plan(["smoke", "edges"], [chunk]) if chunk.supports(c) is None]
    lines = [json.dumps({"kind": "header"})]
    seen_units, seen_keys, seen_tunes = set(), set(), set()
    for i, c in enumerate(cases):
        uk, ck, tk = S.unit_key(chunk, c), repr(chunk.compile_key(c)), S._tune_key(chunk, c)
        comp = None
        if ck not in seen_keys:
            comp = 60.0 if uk not in seen_units else 10.0 if tk not in seen_tunes else 1.0
            seen_units.add(uk)
            seen_keys.add(ck)
            seen_tunes.add(tk)
        wall = (comp or 0) + 0.5 + 2.0 * case_bytes(c) / 2**30
        lines.append(json.dumps({"case_id": c.id, "case": c.model_dump(), "backend": "fla-chunk", "status": "ok",
                                 "timing": {"compile_s": comp, "wall_s": wall, "start_s": float(i)}}))
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(lines) + "\n")
    e = S.fit([p])["fla-chunk"]
    assert (e["unit_compile_s"], e["key_compile_s"], e["variant_compile_s"]) == (60.0, 10.0, 1.0)
    assert e["n_keys"] > 0 and e["n_variants"] > 0  # each class was present in the data
    assert e["case_s"] == pytest.approx(0.5, abs=1e-3) and e["gib_s"] == pytest.approx(2.0, abs=1e-3)
    S.write_costs(S.fit([p]), ["r.jsonl"], tmp_path / "costs.toml")
    m = S.load_costs(tmp_path / "costs.toml")
    assert m.for_backend(chunk) == S.Cost(60.0, 10.0, 0.5, 2.0, 1.0)
    assert m.families["fla"].unit_compile_s == 60.0


def test_shipped_costs_cover_every_gpu_backend_that_runs():
    m = S.load_costs()
    for b in GPU_BACKENDS:
        if b.name != "sglang":  # not installed where the model was measured
            assert b.name in m.backends, b.name
    assert m.backends["fla-chunk"].unit_compile_s > 10 * m.backends["fla-recurrent"].unit_compile_s


def test_shared_cache_env_names_every_cache_and_keeps_what_is_set():
    env = S.shared_cache_env({"HOME": "/h", "TMPDIR": "/t", "USER": "u", "TRITON_CACHE_DIR": "/ci/triton"})
    assert env["TRITON_CACHE_DIR"] == "/ci/triton"
    assert env["FLASHINFER_WORKSPACE_BASE"] == "/h"
    assert env["CUTE_DSL_CACHE_DIR"] == "/t/u/cutlass_python_cache"
    assert env["TRITON_CACHE_AUTOTUNING"] == "1" and env["FLA_CACHE_RESULTS"] == "1"
    assert S.shared_cache_env({"HOME": "/h", "TMPDIR": "/t", "USER": "u"})["TRITON_CACHE_DIR"] == "/h/.triton/cache"


def test_smoke_as_two_shards_merges_to_the_unsharded_run(tmp_path):
    """The twins on the CPU: smoke unsharded and as shards 0/2, 1/2, merged; every result's
    metrics and contracts bit for bit equal to the unsharded run's."""
    specs = ["twin-fla", "twin-flashinfer"]
    kw = dict(device="cpu", isolate=False, progress=False, twin_spec=None)
    whole = run(["smoke"], specs, tmp_path / "all", **kw)
    parts = [run(["smoke"], specs, tmp_path / f"s{i}", shard=(i, 2), **kw) for i in range(2)]
    sizes = [len(load_results(p)[1]) for p in parts]
    assert min(sizes) > 0
    _, merged = merge_results(parts)
    _, ref = load_results(whole)
    assert len(merged) == len(ref) == sum(sizes)

    def key(rs):  # JSON floats round-trip exactly: equal text is equal bits
        return {(r.case_id, r.backend): r.model_dump_json(include={"status", "metrics", "contracts", "path"})
                for r in rs}

    a, b = key(merged), key(ref)
    assert a == b
    assert sum(1 for r in ref if r.status == "ok" and r.metrics) > 50  # real metrics compared, not empty ones


def test_fan_out_gives_every_shard_the_same_named_caches(tmp_path, monkeypatch):
    """--gpus N: each shard process gets its own GPU and the same explicit kernel cache paths."""
    import gdncheck.gate as G

    seen = []

    class Proc:
        def __init__(self, cmd, env, **kw):
            seen.append((cmd, env))

        def wait(self):
            return 0

    monkeypatch.setattr(G.subprocess, "Popen", Proc)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("FLASHINFER_WORKSPACE_BASE", str(tmp_path / "fi"))
    G.fan_out(["--suite", "smoke"], 3, ["4", "5", "6"], tmp_path / "fan")
    assert [e["CUDA_VISIBLE_DEVICES"] for _, e in seen] == ["4", "5", "6"]
    assert [c[c.index("--shard") + 1] for c, _ in seen] == ["0/3", "1/3", "2/3"]
    for var in ("TRITON_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE", "CUTE_DSL_CACHE_DIR", "TRITON_CACHE_AUTOTUNING"):
        assert len({e[var] for _, e in seen}) == 1, var
    assert seen[0][1]["FLASHINFER_WORKSPACE_BASE"] == str(tmp_path / "fi")


# Features the smoke tier leaves to the full tier, per backend (every other capability-matrix
# feature a backend supports in the full tier has a smoke case): slots >= 4096 need 64-72 GiB.
_FULL_ONLY = {
    "fla-chunk": {"disable_state_update"}, "fla-recurrent": {"disable_state_update"},
    "flashinfer-prefill": {"strided gates", "strided pool"},
    "flashinfer-prefill-cp": {"strided gates", "strided pool"},
    "flashinfer-prefill-chunk": {"strided gates", "strided pool"},
    # fp16 inputs on decode: the edges suite's value cases (the full tier), not a smoke path of its own
    "flashinfer-decode": {"no l2norm", "fp16 io"},
    "flashinfer-mtp": {"no l2norm", "strided gates", "strided pool", "write != read"},
    "flashinfer-mtp-ssm": {"no l2norm", "strided gates", "write != read"},
    "fla-interp": {"T > 64 (chunks)", "write != read"},
}


@pytest.mark.parametrize("spec", sorted(set(default_backends(gpu=True) + default_backends(gpu=False))))
def test_smoke_keeps_every_feature_on_every_backend(spec):
    """Merging smoke cases to save compiles must not leave a capability-matrix feature without a
    smoke case on a backend that supports it in the full tier."""
    from gdncheck.suites import load_suite
    from gdncheck.report.matrix import FEATURES

    b = load_backend(spec)

    def covered(cases):
        return {f for f, pred in FEATURES.items() for c in cases if pred(c) and b.supports(c) is None}

    full = covered([c for s in TIERS["full"] for c in load_suite(s)])
    smoke = covered(load_suite("smoke"))
    assert full - smoke <= _FULL_ONLY.get(b.name, set()) | {"slot >= 4096"}, b.name
    if b.name != "sglang":
        assert {"prefill", "decode T=1", "verify T>1"} & smoke  # not vacuous


def test_smoke_fla_chunk_autotunes_few_shapes():
    """Each (shape, prefill or not) of FLA's chunk kernels autotunes for 50-90 s cold: the smoke
    tier keeps them at 11 (21 before the merges listed in cases/smoke.toml)."""
    from gdncheck.suites import load_suite

    chunk = load_backend("fla-chunk")
    ran = [c for c in load_suite("smoke") if chunk.supports(c) is None]
    assert len({(S.unit_key(chunk, c), c.op == "prefill") for c in ran}) <= 11
    assert len({S.unit_key(chunk, c) for c in ran}) <= 8


def test_units_split_along_autotune_keys_only_when_lanes_would_idle():
    """Smoke on 12 lanes: a shape's FLA prefill and decode autotunes run side by side (the unit
    would outlast the lanes' mean load); the full tier is throughput-bound and keeps units whole."""
    smoke = S.plan_units(plan(["smoke"], GPU_BACKENDS))
    split = S.split_for_lanes(smoke, 12)
    assert len(split) > len(smoke)
    assert sorted((b.name, c.id) for u in split for b, c in u.pairs) == \
        sorted((b.name, c.id) for u in smoke for b, c in u.pairs)
    assert all(len(S._tunes(u)) <= 1 for u in split if u.cost > sum(x.cost for x in split) / 12)
    assert [u.key for u in S.split_for_lanes(list(reversed(smoke)), 12)] != [] and \
        sorted(u.key for u in S.split_for_lanes(list(reversed(smoke)), 12)) == sorted(u.key for u in split)
    assert S.lanes_wall(split, 12) < S.lanes_wall(smoke, 12)  # the point of it
    assert S.split_for_lanes(smoke, 1) == smoke
    full = S.plan_units(plan(TIERS["full"], GPU_BACKENDS))
    assert len(S.split_for_lanes(full, 12)) == len(full)
    # FlashInfer prefill's routes share builds in one process: never split apart, however big
    pre = [u for u in smoke if u.key.startswith("('flashinfer.prefill'")]
    assert pre and all(len({b.name for b, _ in u.pairs}) == 3 for u in pre)
    for u in pre:
        u.cost = 1e6
    assert {u.key for u in S.split_for_lanes(pre + split[:5], 12)} >= {u.key for u in pre}


def test_bench_shards_on_the_h100_smoke_run(tmp_path, capsys):
    """scripts/bench_shards.py on the measured cold smoke run and on its results cut into two
    compile-unit shards: the cut's compile sum equals the run's (1.00x), hash shards recompile."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_shards", root / "scripts" / "bench_shards.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run_file = root / "reports" / "h100" / "2026-11-24b" / "smoke_cold" / "results.jsonl.gz"
    from gdncheck.data.io import read_lines
    lines = read_lines(run_file)
    rows = bench.rows(run_file)
    by = {(r["backend"], r["case_id"]): r["unit"] for r in rows}
    where = {u.key: i for i, s in enumerate(S.assign(S.plan_units([r["pair"] for r in rows]), 2)) for u in s}
    shards = [tmp_path / f"s{i}" for i in range(2)]
    out = [[lines[0]], [lines[0]]]
    for line in lines[1:]:
        d = json.loads(line)
        if (d["backend"], d["case_id"]) in by:
            out[where[by[(d["backend"], d["case_id"])]]].append(line)
    for p, ls in zip(shards, out):
        p.write_text("\n".join(ls) + "\n")
    assert bench.main(["--unsharded", str(run_file), "--shards", *map(str, shards), "-n", "2"]) == 0
    text = capsys.readouterr().out
    assert "1.00x (target <= 1.1x) MET" in text
    unit_line = next(x for x in text.splitlines() if "compile unit" in x).split()
    hash_line = next(x for x in text.splitlines() if " hash " in x).split()
    assert unit_line[5] == "1.00x" and float(hash_line[4].rstrip("x")) > 1.1  # n, split, compile, "s", ratio
