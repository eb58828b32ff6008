"""The precision gate: budgets, judging, baselines, exit codes, shards and GPU fan-out (CPU)."""
import json
import math
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gdncheck import gate as G
from gdncheck.budgets import FIELDS, TENSORS, Budgets, load_budgets
from gdncheck.data.errors import Exit, UsageError
from gdncheck.judge import judge_result, judge_run
from gdncheck.report.verdict import verdict_markdown
from gdncheck.data.case import Case
from gdncheck.cli import app
from gdncheck.data.io import load_results, write_results
from gdncheck.data.results import CaseResult, Contracts, Environment, RunHeader, TensorMetrics

sys.path.insert(0, str(Path(__file__).parent))

from crashy_backend import mini_suite as _suite  # noqa: E402

EXACT = "crashy_backend:exact"  # the oracle rounded to the kernel dtypes (tests/crashy_backend.py)
FAULTY = "gdncheck.backends.faults:FinalStateNotWritten"


# ---------------------------------------------------------------- helpers

def _case(op="decode", dtype="bfloat16", state_dtype="float32", seed=0, **kw) -> Case:
    if op == "decode":
        kw.setdefault("seqlens", [1, 1])
    elif op == "verify":
        kw.setdefault("seqlens", [3, 3])
    else:
        kw.setdefault("seqlens", [4, 2])
    return Case(op=op, dtype=dtype, state_dtype=state_dtype, H=2, HV=4, K=16, V=16, seed=seed, **kw)


def _result(backend="be", status="ok", o=1.0, state=1.0, contracts=None, case=None, **kw) -> CaseResult:
    case = case or _case()
    metrics = {}
    if o is not None:
        metrics["o"] = TensorMetrics(count=10, in_floors=o)
    if state is not None:
        metrics["state"] = TensorMetrics(count=10, in_floors=state)
    return CaseResult(case_id=case.id, case=case, backend=backend, status=status, metrics=metrics,
                      contracts=Contracts() if contracts is None and status == "ok" else contracts,
                      repro=case.repro() + f" --backend {backend}", **kw)


def _budgets(tmp_path, text: str, defaults=False) -> Budgets:
    p = tmp_path / "b.toml"
    p.write_text(text)
    return load_budgets([p], defaults=defaults)


def _gate(*args):
    r = CliRunner().invoke(app, ["gate", "--no-progress", "--device", "cpu", *map(str, args)])
    return r.exit_code, r.output + (r.stderr if r.stderr_bytes is not None else "")


def _merge(paths, out):
    from gdncheck.data.io import merge_results
    write_results(out, *merge_results(paths))
    return out


def _comparable(path: Path) -> dict:
    """(case, backend) -> result without what legitimately differs between runs (timing, worker)."""
    _, rs = load_results(path)
    return {(r.case_id, r.backend): r.model_dump(exclude={"timing", "worker", "device"}) for r in rs}


# ---------------------------------------------------------------- budgets

def test_shipped_budgets_load_and_every_entry_says_why():
    b = load_budgets()
    assert len(b.entries) >= 10
    for e in b.entries:
        assert e.why, f"{e.source} has no derivation"
        assert e.tensor in TENSORS and e.field in FIELDS


@pytest.mark.parametrize("op,dtype,sdt,metric,want", [
    ("prefill", "bfloat16", "float32", "o.in_floors", 8),
    ("prefill", "bfloat16", "float32", "state.in_floors", 8 * 2 ** 16),
    ("prefill", "bfloat16", "bfloat16", "state.in_floors", 8),
    ("decode", "bfloat16", "float32", "state.in_floors", 2 ** 13),
    ("verify", "bfloat16", "float32", "intermediate.in_floors", 2 ** 13),
    ("verify", "bfloat16", "bfloat16", "intermediate.in_floors", 8 * 2 ** 16),
    ("prefill", "float32", "float32", "o.in_floors", 8 * 2 ** 13),
])
def test_default_budgets_follow_the_error_model(op, dtype, sdt, metric, want):
    r = _result(case=_case(op, dtype, sdt))
    assert load_budgets().for_result(r)[metric].max == want


def test_flashinfer_fp16_decode_budget_accounts_for_its_bf16_rounding():
    b = load_budgets()
    r = _result(backend="flashinfer-decode", case=_case("decode", "float16", gate_dtype="float16"))
    assert b.for_result(r)["o.in_floors"].max == 64
    assert b.for_result(_result(backend="fla-recurrent", case=r.case))["o.in_floors"].max == 8


def test_specific_entry_beats_wildcard_and_override_wins_ties(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('[[budget]]\nmetric = "o.in_floors"\nmax = 8\n'
                    '[[budget]]\nbackend = "fla-*"\nmetric = "o.in_floors"\nmax = 10\n'
                    '[[budget]]\nbackend = "fla-chunk"\nop = "prefill"\nmetric = "o.in_floors"\nmax = 12\n')
    over = tmp_path / "over.toml"
    over.write_text('[[budget]]\nmetric = "o.in_floors"\nmax = 3\n'
                    '[[budget]]\nbackend = "fla-recurrent"\nmetric = "o.in_floors"\nmax = inf\n')
    b = load_budgets([base, over], defaults=False)
    pick = lambda be, op="prefill": b.for_result(_result(backend=be, case=_case(op)))["o.in_floors"].max  # noqa: E731
    assert pick("other") == 3  # override, same specificity, later
    assert pick("fla-interp") == 10  # glob beats "*"
    assert pick("fla-chunk") == 12  # exact names beat globs
    assert pick("fla-chunk", "decode") == 10
    assert math.isinf(pick("fla-recurrent"))
    # inf switches the metric off
    r = _result(backend="fla-recurrent", o=1e9)
    assert judge_result(r, b) == []


@pytest.mark.parametrize("text,needle", [
    ("[[budget]\nmetric=1", "malformed TOML"),
    ('[[budget]]\nmetric = "o.in_floors"\n', "'max' must be a number"),
    ('[[budget]]\nmetric = "o.in_floors"\nmax = -1\n', "'max' must be a number"),
    ('[[budget]]\nmetric = "o.bogus"\nmax = 1\n', "field one of"),
    ('[[budget]]\nmetric = "in_floors"\nmax = 1\n', "'<tensor>.<field>'"),
    ('[[budget]]\nmetric = "o.in_floors"\nmax = 1\nbackedn = "x"\n', "unknown key(s) ['backedn']"),
    ('[budget]\nmetric = "o.in_floors"\n', "array of tables"),
    ('limits = 3\n', "unknown top-level key"),
])
def test_malformed_budgets_name_file_and_problem(tmp_path, text, needle):
    with pytest.raises(UsageError) as e:
        _budgets(tmp_path, text)
    assert "b.toml" in str(e.value) and needle in str(e.value)


# ---------------------------------------------------------------- judging

def test_statuses_contracts_and_budgets(tmp_path):
    b = _budgets(tmp_path, '[[budget]]\nmetric = "o.in_floors"\nmax = 8\n'
                           '[[budget]]\nmetric = "state.in_floors"\nmax = 8\n')
    assert judge_result(_result(o=7.9, state=2.0), b) == []
    assert judge_result(_result(status="unsupported", reason="no GPU"), b) == []
    for st in ("error", "nan", "crash"):
        (f,) = judge_result(_result(status=st, reason="boom"), b)
        assert f.check == f"status:{st}" and f.severity == math.inf
    (f,) = judge_result(_result(o=20.0), b)
    assert (f.check, f.value, f.limit, f.severity) == ("o.in_floors", 20.0, 8.0, 2.5)
    assert "--backend be" in f.repro
    (f,) = judge_result(_result(o=float("nan")), b)
    assert f.severity == math.inf
    assert judge_result(_result(o=None, state=None), b) == []  # metric absent: nothing to bound
    bad = {
        "contract:untouched_rows": Contracts(untouched_rows=5, untouched_changed=[3]),
        "contract:padding": Contracts(padded_ok=False, padded_details=["row 1: output changed"]),
        "contract:unwritten": Contracts(unwritten=4),
        "contract:nan_inf": Contracts(nan_where_finite=2),
        "contract:state_written": Contracts(state_written=False),
    }
    for check, con in bad.items():
        fs = judge_result(_result(contracts=con), b)
        assert [f.check for f in fs] == [check]


def test_decide_sorts_worst_first_and_counts(tmp_path):
    b = _budgets(tmp_path, '[[budget]]\nmetric = "o.in_floors"\nmax = 8\n')
    rs = [_result(backend="a", o=9.0, case=_case(seed=1)), _result(backend="a", o=80.0, case=_case(seed=2)),
          _result(backend="a", status="crash", case=_case(seed=3)), _result(backend="a", o=1.0, case=_case(seed=4)),
          _result(backend="b", status="unsupported", reason="no", case=_case(seed=1))]
    v = judge_run(rs, b)
    assert v.exit_code == Exit.FAIL
    assert [f.check for f in v.failures] == ["status:crash", "o.in_floors", "o.in_floors"]
    assert [f.value for f in v.failures[1:]] == [80.0, 9.0]
    ev = v.evidence
    assert (ev.results, ev.judged, ev.passed, ev.failed, ev.unsupported) == (5, 4, 1, 3, 1)
    assert ev.unsupported_reasons == {"b": {"no": 1}}
    md = verdict_markdown(v)
    assert "FAIL" in md and "gdncheck repro" in md and "status:crash" in md
    # a later line for the same pair (a resumed retry) replaces the earlier one
    fixed = _result(backend="a", o=1.0, case=_case(seed=2))
    assert len(judge_run(rs + [fixed], b).failures) == 2


def test_required_backend_that_ran_nothing_is_an_environment_failure(tmp_path):
    b = _budgets(tmp_path, '[[budget]]\nmetric = "o.in_floors"\nmax = 8\n')
    rs = [_result(backend="a"), _result(backend="gpu", status="unsupported", reason="needs CUDA")]
    assert judge_run(rs, b).exit_code == Exit.PASS
    v = judge_run(rs, b, require=["gpu"])
    assert v.exit_code == Exit.ENVIRONMENT and any("needs CUDA" in m for m in v.messages)


def test_baseline_regressions_improvements_and_noise(tmp_path):
    b = _budgets(tmp_path, '[[budget]]\nmetric = "o.in_floors"\nmax = 8\n'
                           '[[budget]]\nmetric = "state.in_floors"\nmax = 1e6\n')
    c1, c2, c3, c4 = (_case(seed=s) for s in (1, 2, 3, 4))
    base = [_result(o=2.0, state=100.0, case=c1), _result(o=1.0, state=10.0, case=c2),
            _result(o=0.3, state=1.0, case=c3), _result(o=30.0, case=c4)]
    cur = [_result(o=2.5, state=400.0, case=c1),  # state x4: regression; o x1.25: no
           _result(o=9.0, state=10.0, case=c2),  # passed, now fails the budget
           _result(o=0.9, state=1.0, case=c3),  # x3 but below one floor: noise
           _result(o=3.0, case=c4)]  # failed, now passes; x10 better
    v = judge_run(cur, b, baseline=base, factor=1.5)
    regs = {(f.kind, f.check, f.case_id) for f in v.regressions}
    assert regs == {("regression", "state.in_floors", c1.id), ("now-fails", "passed in baseline", c2.id),
                    ("regression", "o.in_floors", c2.id)}
    imps = {(f.kind, f.case_id) for f in v.improvements}
    assert imps == {("now-passes", c4.id), ("improved", c4.id)}
    assert v.exit_code == Exit.FAIL
    # regressions alone fail a run whose results are all within budget
    ok = [_result(o=2.5, state=400.0, case=c1)]
    v = judge_run(ok, b, baseline=base)
    assert not v.failures and v.exit_code == Exit.FAIL
    assert judge_run(ok, b, baseline=base, factor=5.0).exit_code == Exit.PASS


# ---------------------------------------------------------------- command line, end to end on CPU

def test_cli_pass_then_fault_fails_with_table_and_verdict_files(tmp_path):
    suite = _suite(tmp_path)
    code, text = _gate("-s", suite, "-b", EXACT, "--out", tmp_path / "ok")
    assert code == 0, text
    verdict = json.loads((tmp_path / "ok" / "gate.json").read_text())
    assert verdict["exit_code"] == 0 and verdict["evidence"]["passed"] == 6 == verdict["evidence"]["planned"]
    assert (tmp_path / "ok" / "gate.md").read_text().startswith("## gdncheck precision gate: PASS")

    code, text = _gate("-s", suite, "-b", FAULTY, "--out", tmp_path / "bad")
    assert code == 1, text
    assert "contract:state_written" in text and "repro: gdncheck repro" in text
    assert f"--backend {FAULTY}" in text  # the repro line names the spec that loads the backend
    verdict = json.loads((tmp_path / "bad" / "gate.json").read_text())
    assert verdict["exit_code"] == 1 and verdict["failures"][0]["backend"] == "fault-final_state_not_written"

    # judge an existing results file against itself as the baseline: no regressions
    res = tmp_path / "ok" / "results.jsonl"
    code, text = _gate("--results", res, "--baseline", res, "--out", tmp_path / "re")
    assert code == 0, text
    v = json.loads((tmp_path / "re" / "gate.json").read_text())
    assert v["regressions"] == [] and v["baseline"]["compared"] == 6 == v["baseline"]["identical"]


def test_cli_budget_override_turns_red(tmp_path):
    suite = _suite(tmp_path, seeds=(3,))
    strict = tmp_path / "strict.toml"  # the oracle rounded once is exactly 1 floor: 0.5 must fail
    strict.write_text('[[budget]]\nmetric = "o.in_floors"\nmax = 0.5\n')
    code, text = _gate("-s", suite, "-b", EXACT, "--budgets", strict, "--out", tmp_path / "o")
    assert code == 1, text
    assert "o.in_floors" in text


def test_cli_exit_codes_for_bad_input_and_environment(tmp_path):
    suite = _suite(tmp_path, seeds=(1,))
    bad = tmp_path / "bad.toml"
    bad.write_text("[[budget]]\nmetric = 'o.in_floors'\nmax = 'lots'\n")
    code, text = _gate("-s", suite, "-b", EXACT, "--budgets", bad, "--out", tmp_path / "a")
    assert code == 2 and "bad.toml" in text
    code, text = _gate("-s", suite, "-b", EXACT, "--budgets", tmp_path / "missing.toml", "--out", tmp_path / "a")
    assert code == 2 and "missing.toml" in text and "not found" in text
    code, text = _gate("-s", suite, "-b", "no-such-backend", "--out", tmp_path / "a")
    assert code == 2 and "no-such-backend" in text
    code, text = _gate("--tier", "nightly", "-b", EXACT, "--out", tmp_path / "a")
    assert code == 2 and "unknown tier" in text
    code, text = _gate("-s", tmp_path / "nope.toml", "-b", EXACT, "--out", tmp_path / "a")
    assert code == 2
    code, text = _gate("-s", suite, "-b", EXACT, "--shard", "3/2", "--out", tmp_path / "a")
    assert code == 2
    # baseline from another schema version
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"schema_version": 0, "kind": "header", "run_id": "x", "suites": [], "backends": [],
                               "environment": {}}) + "\n")
    code, text = _gate("-s", suite, "-b", EXACT, "--baseline", old, "--out", tmp_path / "a")
    assert code == 2 and "old.jsonl" in text and "schema version 0" in text
    code, text = _gate("-s", suite, "-b", EXACT, "--baseline", tmp_path / "none.jsonl", "--out", tmp_path / "a")
    assert code == 2 and "none.jsonl" in text
    # environment: a GPU run without a GPU, a required backend that cannot run here
    r = CliRunner().invoke(app, ["gate", "--no-progress", "--device", "cuda", "-s", str(suite), "-b", EXACT])
    assert r.exit_code == 3
    code, text = _gate("-s", suite, "-b", EXACT, "--require", "flashinfer-decode", "--out", tmp_path / "a")
    assert code == 3 and "flashinfer-decode" in text


# ---------------------------------------------------------------- scale-out

def test_shards_merged_equal_unsharded_run(tmp_path):
    suite = _suite(tmp_path, seeds=(1, 2, 3))
    code, _ = _gate("-s", suite, "-b", EXACT, "-b", FAULTY, "--out", tmp_path / "all")
    assert code == 1
    shards = []
    for i in range(3):
        _gate("-s", suite, "-b", EXACT, "-b", FAULTY, "--shard", f"{i}/3", "--out", tmp_path / f"s{i}")
        shards.append(tmp_path / f"s{i}" / "results.jsonl")
    sizes = [len(load_results(p)[1]) for p in shards]
    assert sum(sizes) == 18 and max(sizes) < 18  # a real split, nothing lost or doubled
    merged = _merge(shards, tmp_path / "merged.jsonl")
    assert _comparable(merged) == _comparable(tmp_path / "all" / "results.jsonl")
    code, _ = _gate("--results", merged, "--out", tmp_path / "mv")
    v_all = json.loads((tmp_path / "all" / "gate.json").read_text())
    v_merged = json.loads((tmp_path / "mv" / "gate.json").read_text())
    drop = ("shards", "results")
    assert code == 1 and {k: v for k, v in v_merged["evidence"].items() if k not in drop} == \
        {k: v for k, v in v_all["evidence"].items() if k not in drop}
    assert [f["case_id"] for f in v_merged["failures"]] == [f["case_id"] for f in v_all["failures"]]


def test_fan_out_one_process_per_gpu_then_merge(tmp_path, monkeypatch):
    """The --gpus path: one `gdncheck gate --shard i/n` subprocess per GPU id, then merge (CPU here)."""
    suite = _suite(tmp_path, seeds=(1,))
    argv = ["--suite", str(suite), "--backend", EXACT, "--device", "cpu"]
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the children import crashy_backend
    paths = G.fan_out(argv, 2, ["0", "1"], tmp_path / "fan")
    for i, p in enumerate(paths):
        h, _ = load_results(p)
        assert h.shard == f"{i}/2"
    merged = _merge(paths, tmp_path / "fan" / "results.jsonl")
    code, _ = _gate("-s", suite, "-b", EXACT, "--out", tmp_path / "one")
    assert code == 0
    assert _comparable(merged) == _comparable(tmp_path / "one" / "results.jsonl")


def test_fan_out_propagates_config_errors(tmp_path):
    with pytest.raises(UsageError, match="shard 0/1 exited 2"):
        G.fan_out(["--suite", "no-such-suite", "--backend", EXACT, "--device", "cpu"], 1, ["0"], tmp_path / "fan")


@pytest.mark.parametrize("wid,gpus,want", [
    ("gw0", ["0", "1"], "0"), ("gw3", ["0", "1"], "1"), ("gw5", ["4", "6", "7"], "7"),
    ("gw2", [], None), (None, ["0"], None), ("master", ["0"], None),
])
def test_xdist_worker_to_gpu(wid, gpus, want):
    assert G.gpu_for_worker(wid, gpus) == want


def test_visible_gpus_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert G.visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert G.visible_gpus() == []


def test_results_file_round_trip_keeps_versions(tmp_path):
    h = RunHeader(run_id="r", suites=["x"], backends=["be"], environment=Environment())
    for name in ("r.jsonl", "r.jsonl.gz", "r.jsonl.xz"):  # committed baselines are compressed
        p = tmp_path / name
        write_results(p, h, [_result()])
        assert len(load_results(p)[1]) == 1
    p = tmp_path / "r.jsonl"
    p.write_text(p.read_text().replace('"schema_version":2', '"schema_version":9', 1))
    with pytest.raises(UsageError, match="r.jsonl: schema version 9"):
        load_results(p)
