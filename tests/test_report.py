"""Reports: schema round trip, loading, summary, HTML/Markdown/JUnit rendering, compare, merge."""
import json
import math
import random
import re
from xml.etree import ElementTree as ET

import pytest
import typer
from typer.testing import CliRunner

from gdncheck.backends import load_backend
from gdncheck.backends.base import Outputs
from gdncheck.data.case import Case
from gdncheck.inputs import materialize
from gdncheck.budgets import load_budgets
from gdncheck.cli import app as _cli_app
from gdncheck.data.drift import DriftResult, PositionCurve, RolloutCurve
from gdncheck.data.io import ResultsError, load_results, merge_results, write_results
from gdncheck.data.results import SCHEMA_VERSION, CaseResult, Contracts, Environment, RunHeader, TensorMetrics
from gdncheck.judge import compare, judge_result, judge_run
from gdncheck.metrics import evaluate
from gdncheck.oracle import expected
from gdncheck.report.render import render as _render
from gdncheck.report.summary import summarize

BUDGETS = load_budgets()


def render(h, rs, out, **kw):
    """Render with the judge's verdict over ``rs`` (the shipped budgets)."""
    return _render(h, rs, judge_run(rs, BUDGETS, planned=h.planned), BUDGETS, out, **kw)

BACKENDS = ["twin-fla", "twin-flashinfer"]


def header(run_id="r1", backends=BACKENDS, **kw):
    return RunHeader(run_id=run_id, suites=["smoke"], backends=backends,
                     environment=Environment(torch="2.13", seeds=[0]), **kw)


def tm(x):
    return TensorMetrics(count=100, rel_l2=1e-3 * x, floor_rel_l2=1e-3, in_floors=x, ulp_p50=0, ulp_p99=1, ulp_max=2)


def result(case, backend, status="ok", o=1.2, state=1.0, contracts=None, **kw):
    metrics = {} if status in ("unsupported", "error", "crash") else {"o": tm(o), "state": tm(state)}
    return CaseResult(case_id=case.id, case=case, backend=backend, status=status, metrics=metrics,
                      contracts=contracts if contracts is not None else (Contracts() if metrics else None),
                      repro=case.repro(), reason="no" if status != "ok" else None, **kw)


def synthetic(seed=0, n=12):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        op = ["decode", "prefill", "verify"][i % 3]
        seqlens = {"decode": [1, 1], "prefill": [5, 3], "verify": [3, 3]}[op]
        c = Case(op=op, seqlens=seqlens, H=2, HV=4, K=8, V=8, dtype=["bfloat16", "float16"][i % 2],
                 seed=seed * 100 + i, name=f"c{i}")
        for b in BACKENDS:
            out.append(result(c, b, o=1 + rnd.random() * 3, state=1 + rnd.random()))
    return out


# ---------------------------------------------------------------- schema and files

def test_schema_round_trip():
    c = Case(op="verify", seqlens=[4, 4], pool_size=5, read_indices=[1, -1], intermediate=True, seed=3, name="x")
    r = result(c, "twin-fla", contracts=Contracts(untouched_rows=3, untouched_changed=[2], padded_ok=False,
                                                   padded_details=["row 1"], details=["d"]))
    r.metrics["intermediate"] = TensorMetrics(count=1, rel_l2=0.5, floor_rel_l2=0.0, in_floors=math.inf)
    back = CaseResult.model_validate_json(r.model_dump_json())
    assert back == r and back.case.id == c.id and back.metrics["intermediate"].in_floors == math.inf
    h = header(shard="0/2")
    assert RunHeader.model_validate_json(h.model_dump_json()) == h
    assert [f.check for f in judge_result(back, BUDGETS)][:2] == ["contract:untouched_rows", "contract:padding"]


def test_load_tolerates_truncated_tail(tmp_path):
    rs = synthetic(1, 4)
    p = tmp_path / "results.jsonl"
    write_results(p, header(), rs)
    text = p.read_text()
    p.write_text(text + rs[0].model_dump_json()[:57])  # killed mid-write
    h, back = load_results(p)
    assert h.run_id == "r1" and back == rs
    lines = text.splitlines()
    p.write_text("\n".join([lines[0], lines[1][:30], *lines[2:]]) + "\n")
    with pytest.raises(ResultsError, match=r"results\.jsonl:2: not a case result"):
        load_results(p)
    d = json.loads(lines[0])
    d["schema_version"] = SCHEMA_VERSION + 1
    p.write_text(json.dumps(d) + "\n")
    with pytest.raises(ResultsError, match="schema version"):
        load_results(p)


def test_summary_counts():
    rs = synthetic(2, 6)
    c = rs[0].case
    rs += [result(c, "fla-interp", status="unsupported"), result(c, "fla-interp2", status="crash"),
           result(c, "twin-x", contracts=Contracts(unwritten=4))]
    s = summarize(header(), rs, judge_run(rs, BUDGETS), BUDGETS)
    t = s["totals"]
    assert t["results"] == 15 and t["unsupported"] == 1 and t["crash"] == 1 and t["fail"] == 2 and t["passed"] == 12
    g = {(x["backend"], x["op"], x["dtype"]): x for x in s["groups"]}
    twin = g[("twin-fla", "decode", "bfloat16")]
    vals = sorted(r.metrics["o"].in_floors for r in rs if r.backend == "twin-fla" and r.case.op == "decode"
                  and r.case.dtype == "bfloat16")
    assert twin["o"]["max"] == vals[-1] and twin["o"]["n"] == len(vals)
    assert {f["backend"] for f in s["failures"]} == {"fla-interp2", "twin-x"}


# ---------------------------------------------------------------- rendering

def _drift():
    c = Case(op="prefill", seqlens=[64], H=1, HV=2, K=8, V=8)
    pos = [PositionCurve(backend=b, T=64, case=c, bin_edges=[0, 32, 64], rel_l2=[1e-3, 2e-3],
                         floor_rel_l2=[5e-4, 5e-4], flip_rate=0.01) for b in BACKENDS]
    roll = [RolloutCurve(backend=b, state_dtype=sd, steps=100, log_steps=[1, 10, 100], state_rel_l2=[1e-3, 2e-3, 4e-3],
                         state_floor=[1e-3] * 3, o_rel_l2=[2e-3] * 3, growth=0.3, flip_rate=0.0)
            for b in BACKENDS for sd in ("float32", "bfloat16")]
    return DriftResult(position=pos, rollout=roll)


def test_render_names_every_plot(tmp_path):
    rs = synthetic(3, 4)
    bad = result(rs[0].case, "twin-fla", status="nan")
    rs[0] = bad
    r = render(header(), rs, tmp_path, drift=[_drift()])
    page = (tmp_path / "report.html").read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert captions == [t.replace("&", "&amp;") for t in r.figures]
    assert page.count("<img ") == len(r.figures) == len(captions)
    want = {"overview: output error in rounding floors by backend and op",
            "error distribution: twin-fla / decode / bfloat16", "error distribution: twin-flashinfer / verify / bfloat16",
            "position error: T=64 bfloat16", "rollout state error: state bfloat16", "rollout output error: state float32"}
    assert want <= set(r.figures)
    assert "data:image/png;base64,iVBOR" in page  # PNG magic, inline
    md = (tmp_path / "report.md").read_text()
    assert bad.repro in md and "## Rollouts" in md and "| twin-fla | decode | bfloat16 |" in md
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["totals"]["nan"] == 1 and s["failures"][0]["case_id"] == bad.case_id


def test_junit(tmp_path):
    rs = synthetic(4, 3)
    c = rs[0].case
    rs += [result(c, "x", status="unsupported"), result(c, "x", status="error"),
           result(c, "y", contracts=Contracts(untouched_changed=[3]))]
    render(header(), rs, tmp_path, plots=False)
    root = ET.parse(tmp_path / "junit.xml").getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == len(rs)
    assert len(root.findall(".//skipped")) == 1
    fails = root.findall(".//failure")
    assert len(fails) == 2 and any("pool rows [3] changed" in f.get("message") for f in fails)
    assert sum(int(s.get("tests")) for s in root.findall("testsuite")) == len(rs)


def test_render_real_evaluations(tmp_path):
    """Twin outputs through evaluate() into results, rendered."""
    rs = []
    for seed in (0, 1):
        c = Case(op="decode", seqlens=[1] * 3, H=1, HV=2, K=8, V=8, pool_size=5, read_indices=[0, 2, 4], seed=seed)
        for b in BACKENDS:
            be = load_backend(b)
            inp = materialize(c)
            before = inp.clone()
            exp = expected(before, be.policy(c))
            out: Outputs = be.run(inp)
            m, con = evaluate(before, out, exp)
            rs.append(CaseResult(case_id=c.id, case=c, backend=b, status="ok", metrics=m, contracts=con,
                                 repro=c.repro(), path=out.path))
    r = render(header(), rs, tmp_path)
    assert r.summary["totals"]["passed"] == 4, r.summary["failures"]
    for g in r.summary["groups"]:
        assert 0.5 < g["o"]["max"] < 10  # twins: a few rounding floors
    assert "error distribution: twin-fla / decode / bfloat16" in r.figures


# ---------------------------------------------------------------- compare, merge (CLI)

def _app():
    return _cli_app


def test_compare_finds_planted_regression(tmp_path):
    a = synthetic(5, 9)
    b = [r.model_copy(deep=True) for r in a]
    victim = b[4]
    victim.metrics["o"] = tm(a[4].metrics["o"].in_floors * 5)
    b[7] = result(b[7].case, b[7].backend, status="crash")
    a[2] = result(a[2].case, a[2].backend, status="error")  # fixed in b
    regs, imps, ev = compare(b, a, BUDGETS)
    want = {("regression", victim.case_id, victim.backend, "o.in_floors"),
            ("now-fails", b[7].case_id, b[7].backend, "passed in baseline")}
    if victim.metrics["o"].in_floors > 8:  # past the shipped budget too
        want.add(("now-fails", victim.case_id, victim.backend, "passed in baseline"))
    assert {(f.kind, f.case_id, f.backend, f.check) for f in regs} == want
    assert [f.severity for f in regs if f.kind == "regression"] == [pytest.approx(5, rel=0.5)]
    assert [f.case_id for f in imps if f.kind == "now-passes"] == [a[2].case_id]
    assert ev.compared == len(a) and ev.identical == len(a) - 3  # every pair judged in both; 3 changed
    assert compare(a, a, BUDGETS)[0] == []
    assert {f.kind for f in compare(b, a, BUDGETS, factor=10)[0]} == {"now-fails"}  # the x5 is below x10

    pa, pb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_results(pa, header("A"), a)
    write_results(pb, header("B"), b)
    run = CliRunner().invoke
    res = run(_app(), ["report", "compare", str(pa), str(pb), "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 1, res.output
    assert "regressions" in res.output and json.loads((tmp_path / "c.json").read_text())["regressions"]
    res = run(_app(), ["report", "compare", str(pa), str(pa)])  # a's own error fails it; no regression
    assert res.exit_code == 1 and "0 regressions" in res.output
    clean = tmp_path / "clean.jsonl"
    write_results(clean, header("C"), [r for r in a if r.status == "ok"])
    assert run(_app(), ["report", "compare", str(clean), str(clean)]).exit_code == 0


def test_merge_is_the_union(tmp_path):
    rs = synthetic(6, 8)
    s0, s1 = rs[::2], rs[1::2]
    p0, p1, out = tmp_path / "s0.jsonl", tmp_path / "s1.jsonl", tmp_path / "m.jsonl"
    write_results(p0, header(shard="0/2"), s0)
    write_results(p1, header(shard="1/2", backends=BACKENDS + ["fla-interp"]), s1)
    res = CliRunner().invoke(_app(), ["report", "merge", str(p0), str(p1), "--out", str(out)])
    assert res.exit_code == 0, res.output
    h, back = load_results(out)
    key = lambda r: (r.case_id, r.backend)  # noqa: E731
    assert sorted(back, key=key) == sorted(rs, key=key)
    assert h.shard is None and h.backends == BACKENDS + ["fla-interp"]
    with pytest.raises(ResultsError, match="shard 0/2 given twice"):
        merge_results([p0, p1, p0])
    with pytest.raises(ResultsError, match="shard.s. 1/2 missing"):
        merge_results([p0])
    d = json.loads(p1.read_text().splitlines()[0])
    d["schema_version"] = 99
    p1.write_text("\n".join([json.dumps(d)] + p1.read_text().splitlines()[1:]) + "\n")
    res = CliRunner().invoke(_app(), ["report", "merge", str(p0), str(p1), "--out", str(out)])
    assert res.exit_code == 2 and "schema version 99" in res.output


def test_render_cli(tmp_path):
    p = tmp_path / "r.jsonl"
    write_results(p, header(), synthetic(7, 3))
    (tmp_path / "d.json").write_text(_drift().model_dump_json())
    res = CliRunner().invoke(_app(), ["report", "render", str(p), "--drift", str(tmp_path / "d.json"),
                                      "--out", str(tmp_path / "out"), "--no-plots"])
    assert res.exit_code == 0, res.output
    for f in ("summary.json", "report.md", "report.html", "junit.xml"):
        assert (tmp_path / "out" / f).stat().st_size > 0


def test_capability_matrix_marks_ok_wrong_and_unsupported(tmp_path):
    import sys as _sys
    from pathlib import Path as _P

    _sys.path.insert(0, str(_P(__file__).parent))
    from crashy_backend import mini_suite

    from gdncheck.report import matrix
    from gdncheck.data.io import load_results as _load
    from gdncheck.run import run as _run_dir

    def _run(*a, **kw):
        return _run_dir(*a, **kw).dir.results

    suite = mini_suite(tmp_path, (1, 2))
    out = _run([str(suite)], ["crashy_backend:exact", "gdncheck.backends.faults:FinalStateNotWritten",
                              "fla-interp"], tmp_path / "r", device="cpu", isolate=False, progress=False)
    _, rs = _load(out)
    b = load_budgets()
    m = matrix.build(rs, lambda r: judge_result(r, b))
    cells = m["cells"]
    exact, faulty = "test-exact", [x for x in m["backends"] if x not in ("test-exact", "fla-interp")][0]
    assert cells["prefill"][exact]["text"] == "ok 2"
    assert cells["prefill"][faulty]["text"].startswith("**wrong 2/2**")
    assert "contract:state_written" in cells["prefill"][faulty]["text"]
    assert cells["intermediate"]["fla-interp"]["text"].startswith("unsupported (")
    assert cells["slot >= 4096"][exact]["text"] == "–"
    md = matrix.markdown(m)
    assert md.count("\n") == len(matrix.FEATURES) + 2


def test_matrix_cli_joins_runs_in_header_order(tmp_path):
    import sys as _sys
    from pathlib import Path as _P

    _sys.path.insert(0, str(_P(__file__).parent))
    from crashy_backend import mini_suite
    from typer.testing import CliRunner

    from gdncheck.cli import app
    from gdncheck.run import run as _run_dir

    def _run(*a, **kw):
        return _run_dir(*a, **kw).dir.results

    suite = mini_suite(tmp_path, (1,))
    a = _run([str(suite)], ["twin-fla"], tmp_path / "a", device="cpu", isolate=False, progress=False)
    b = _run([str(suite)], ["crashy_backend:exact"], tmp_path / "b", device="cpu", isolate=False,
             progress=False)
    r = CliRunner().invoke(app, ["report", "matrix", str(a), str(b), "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m" / "matrix.json").read_text())
    assert m["backends"] == ["twin-fla", "test-exact"]
    assert m["cells"]["prefill"]["twin-fla"]["text"] == "ok 1" and m["cells"]["prefill"]["test-exact"]["text"] == "ok 1"
