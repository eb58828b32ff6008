"""The findings suite names one trigger per README finding, and the findings table says per version
which still fail: judged by the gate's own judge on results built here (no GPU)."""
from __future__ import annotations

from gdncheck.suites import load_suite
from gdncheck.findings import markdown, status_table
from gdncheck.gate import TIERS
from gdncheck.data.results import CaseResult, Contracts


def test_every_finding_has_a_named_trigger():
    cases = load_suite("findings")
    tagged = {t.removeprefix("finding:") for c in cases for t in c.tags if t.startswith("finding:")}
    assert {str(n) for n in range(1, 11)} <= tagged
    for c in cases:
        assert c.name and c.name.startswith("findings/")
        assert any(t.startswith("on:") for t in c.tags), c.name
    assert "findings" in TIERS["full"]


def test_findings_triggers():
    by = {c.name: c for c in load_suite("findings")}
    f2 = by["findings/2/bf16-mtp-wide_vec-final-state"]
    assert f2.state_dtype == "bfloat16" and f2.T > 1 and f2.intermediate and f2.B * f2.HV >= 128
    assert by["findings/2/bf16-mtp-ilp4-control"].B * 32 < 128
    f9 = by["findings/9/verify-slot4096-silent"]
    assert f9.HV == 32 and max(f9.read_indices) >= 4096 and f9.op == "verify"
    f3 = by["findings/3/fp32-t1-write-minus-one"]
    assert f3.state_dtype == "float32" and f3.T == 1 and -1 in f3.write_indices
    assert {(c.H, c.HV) for c in load_suite("findings") if "finding:8" in c.tags} == {(2, 4), (2, 6)}
    assert all(0 in c.seqlens for c in load_suite("findings") if "finding:8" in c.tags or "finding:4" in c.tags)


def _res(case, backend, version, ok):
    return CaseResult(case_id=case.id, case=case, backend=backend, backend_version=version,
                      status="ok" if ok else "error", reason=None if ok else "CUDA error: illegal memory access",
                      contracts=Contracts())


def test_status_table_per_version():
    cases = [c for c in load_suite("findings") if "finding:1" in c.tags or "finding:8" in c.tags]
    f1 = cases[0]
    f8 = [c for c in cases if "finding:8" in c.tags]
    rs = [_res(f1, "flashinfer-mtp", "0.7.2.post1", False), _res(f1, "flashinfer-mtp", "0.7.4", True),
          _res(f1, "twin-flashinfer", "0.7.4", False)]  # not the backend the finding is on: ignored
    rs += [_res(c, "flashinfer-prefill", v, v == "0.7.4" and i > 0) for v in ("0.7.2.post1", "0.7.4")
           for i, c in enumerate(f8)]
    t = status_table(rs)
    assert t[("1", "flashinfer-mtp", "0.7.2.post1")][0] == "still failing"
    assert t[("1", "flashinfer-mtp", "0.7.4")][0] == "fixed"
    assert ("1", "twin-flashinfer", "0.7.4") not in t
    assert t[("8", "flashinfer-prefill", "0.7.4")] == ("still failing", [f8[0].name])
    assert "| 1 | flashinfer-mtp | 0.7.4 | **fixed** |" in markdown(t)


def test_verdicts_attribute_a_finding_only_to_the_backends_it_names():
    """A finding's case failing on another backend fails the run, for that backend's own reason:
    the verdict's known findings (and the per-version table) count only the ``on:`` backends.
    Finding 8's engine case fails on vllm-chunk through finding 10, not through finding 8."""
    from gdncheck.budgets import load_budgets
    from gdncheck.judge import findings_of, judge_run, known_findings

    by = {c.name: c for c in load_suite("findings")}
    f8 = by["findings/8/engine-flashinfer-zero-length/middle"]
    f10 = by["findings/10/chunk-index-zero-length/middle"]
    rs = [_res(f8, "vllm-flashinfer-prefill", "0.33.0", False), _res(f8, "vllm-chunk", "0.33.0", False),
          _res(f10, "vllm-chunk", "0.33.0", False), _res(f10, "sglang-extend", "0.5.23", True)]
    assert findings_of(rs[1]) == [] and findings_of(rs[0]) == ["8"] and findings_of(rs[2]) == ["10"]
    known = {k.finding: k for k in known_findings(rs, load_budgets())}
    assert known["8"].backends == {"vllm-flashinfer-prefill": "still failing"}
    assert known["10"].backends == {"sglang-extend": "fixed", "vllm-chunk": "still failing"}
    assert known["10"].state == "still failing"
    v = judge_run(rs, load_budgets())
    assert v.exit_code == 1 and len(v.failures) == 3  # the vllm-chunk failure of finding 8's case still counts
