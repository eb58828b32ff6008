"""``gdncheck explain``: attribution of a difference between two kernels to rounding choices.

Known answers: twins that differ in exactly one switch must be attributed to that switch and
only it on >= 19 of 20 seeds (95%); identical kernels give "no difference"; planted faults
(not a rounding choice) give "not explained".
"""
from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from gdncheck.backends.faults import FAULTS
from gdncheck.backends.twins import FlashInferTwin, FLATwin
from gdncheck.data.case import Case
from gdncheck.explain import FAMILIES, KNOB_GRID, Side, default_cases, explain, open_side

SEEDS = 20
NEEDED = 19  # >= 95% of 20


def _tiny(seed: int) -> list[Case]:
    """Four tiny cases (K = V = 16, H = 1, HV = 2) on which every switch of KNOB_GRID is seen:
    bf16 prefill with raw gates (inverse/store dtypes, gate arithmetic), bf16 decode (q/k norm
    placement, state between calls), fp16 verify on a bf16 state (output in bf16, per-step
    state rounding), fp32 verify (beta, exp, fast math stand above the fp32 floor)."""
    c = dict(H=1, HV=2, K=16, V=16, gate_source="raw")
    return [
        Case(op="prefill", seqlens=[20, 5], seed=seed, **c),
        Case(op="decode", seqlens=[1, 1], seed=seed + 1, **c),
        Case(op="verify", seqlens=[3, 3], dtype="float16", gate_dtype="float16", state_dtype="bfloat16",
             seed=seed + 2, **c),
        Case(op="verify", seqlens=[2, 2], dtype="float32", seed=seed + 3, **c),
    ]


def _side(b) -> Side:
    return Side(name=b.name, version="", family_twin=b.twin, backend=b, zero_length_policy=b.zero_length_policy)


# (knob, value): every non-default value of the grid, flipped on the FLA and the FlashInfer base
SWITCHES = [(k, v) for k, vals in KNOB_GRID.items() for v in vals[1:]]


@pytest.mark.parametrize("knob,value", SWITCHES, ids=[f"{k}={v}" for k, v in SWITCHES])
def test_one_switch_is_attributed_to_it_alone(knob, value):
    hits, misses = 0, []
    for s in range(SEEDS):
        base = FLATwin if s % 2 == 0 else FlashInferTwin  # both families as the baseline
        fam = FAMILIES[base.name]
        v = value if value != fam[knob] else next(x for x in KNOB_GRID[knob] if x != fam[knob] and x is not None)
        a, b = base(), base(**{knob: v})  # v: the switch, or its other value where the family holds it
        b.name = f"{base.name}[{knob}={v}]"
        ex = explain(_side(a), _side(b), _tiny(1000 * s))
        got = {sw["knob"] for sw in ex.switches}
        if ex.verdict == "explained" and got == {knob}:
            hits += 1
        else:
            misses.append((s, ex.verdict, sorted(got)))
    assert hits >= NEEDED, f"{knob}={value}: {hits}/{SEEDS} attributed; misses {misses}"


@pytest.mark.parametrize("twin", [FLATwin, FlashInferTwin])
def test_identical_kernels_give_no_difference(twin):
    for s in range(3):
        ex = explain(_side(twin()), _side(twin()), _tiny(7 + s))
        assert ex.verdict == "no difference", ex.summary
        assert ex.switches == []
        assert all(r.channels["o"].ab_floors == 0 for r in ex.cases)


@pytest.mark.parametrize("fault", ["gva_mapping_wrong", "chunk_boundary_error", "beta_not_sigmoided"])
def test_planted_fault_is_not_explained_by_rounding(fault):
    cases = default_cases(16, 16)  # GVA (HV = 2H), prefill crossing a chunk, raw-gate cases
    ex = explain(_side(FAULTS[fault]()), _side(FlashInferTwin()), cases)
    assert ex.verdict == "not explained", (ex.verdict, ex.summary)
    assert ex.share is not None and ex.share < 0.36


def test_fault_that_is_a_rounding_choice_is_explained():
    """fault-beta_rounded *is* the beta switch: explain must name it (the converse of the above)."""
    ex = explain(_side(FAULTS["beta_rounded"]()), _side(FlashInferTwin()), _tiny(3))
    assert ex.verdict == "explained"
    assert [s["knob"] for s in ex.switches] == ["beta_dtype"]
    assert "rounds beta to bfloat16" in ex.summary


def test_twin_fla_vs_twin_flashinfer_names_their_switches():
    ex = explain(open_side("twin-fla"), open_side("twin-flashinfer"), default_cases(16, 16))
    assert ex.verdict == "explained"
    assert {s["knob"] for s in ex.switches} == {"inv_dtype", "per_step_state_round", "bf16_output"}
    # the switches act on disjoint elements (prefill, bf16-state verify, fp16 decode/verify):
    # their shares alone add up to the whole
    assert abs(sum(s["share_alone"] for s in ex.switches) - 1.0) < 0.02
    assert ex.where.bins_ab and ex.where.heads


def test_kernels_no_twin_matches_exactly_still_get_their_switches():
    """Kernels whose arithmetic no twin reproduces (float64 instead of fp32: another rounding of
    every sum, as a real kernel's order of operations) are fitted only up to that noise; the
    switches that separate the FLA and FlashInfer roundings must still be named, and nothing else."""
    a, b = FLATwin(compute_dtype="float64"), FlashInferTwin(compute_dtype="float64")
    ex = explain(_side(a), _side(b), default_cases(16, 16))
    assert ex.fit_a.score > 0 and ex.fit_b.score > 0  # not exact fits
    assert ex.verdict == "explained", ex.summary
    assert {s["knob"] for s in ex.switches} == {"inv_dtype", "per_step_state_round", "bf16_output"}


runner = CliRunner()


def _cli(*args):
    from gdncheck.cli import app
    return runner.invoke(app, list(args))


def test_cli_reports_and_exit_codes(tmp_path):
    t0 = time.perf_counter()
    r = _cli("explain", "twin-fla[beta_dtype=bfloat16]", "twin-fla", "--device", "cpu",
             "--head-dim", "16", "--out", str(tmp_path / "rep"))
    assert r.exit_code == 0, r.output
    assert "\x1b[" not in r.output and "[bold" not in r.output  # no markup or ANSI codes in logs
    assert "A rounds beta to bfloat16 and B does not" in r.output
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    data = json.loads((tmp_path / "rep" / "explain.json").read_text())
    assert data["verdict"] == "explained" and data["switches"][0]["knob"] == "beta_dtype"
    assert "data:image/png;base64," in (tmp_path / "rep" / "explain.html").read_text()
    assert "| beta_dtype |" in (tmp_path / "rep" / "explain.md").read_text()

    r = _cli("explain", "no-such-kernel", "twin-fla")
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    r = _cli("explain", "twin-fla", "twin-flashinfer", "--device", "cpu", "--case", "nope")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    r = _cli("explain", "twin-fla", "twin-flashinfer", "--device", "cpu", "-s", "no-such-suite")
    assert r.exit_code == 2
    r = _cli("explain", "tests.test_explain:_unavailable", "twin-fla", "--device", "cpu")
    assert r.exit_code == 3, r.output
    r = _cli("explain", "tests.test_explain:_prefill_only", "tests.test_explain:_decode_only",
             "--device", "cpu", "--head-dim", "16")
    assert r.exit_code == 3 and "nothing to compare" in r.output
    assert time.perf_counter() - t0 < 60


def test_saved_outputs_of_two_runs_are_explained_like_live_ones(tmp_path):
    """One backend per process (two package versions): save each, explain from the files."""
    args = ("--device", "cpu", "--head-dim", "16", "--case", "explain/prefill/bf16", "--case", "explain/decode/fp16")
    assert _cli("explain", "twin-fla", "--save", str(tmp_path), *args).exit_code == 0
    assert _cli("explain", "twin-flashinfer", "--save", str(tmp_path), *args).exit_code == 0
    dirs = sorted(p for p in tmp_path.iterdir() if (p / "index.json").exists())
    assert [d.name.split("-gdncheck")[0] for d in dirs] == ["twin-fla", "twin-flashinfer"]
    r = _cli("explain", str(dirs[0]), str(dirs[1]), "--device", "cpu", "--out", str(tmp_path / "rep"))
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "rep" / "explain.json").read_text())
    cases = [c for c in default_cases(16, 16) if c.name in ("explain/prefill/bf16", "explain/decode/fp16")]
    live = explain(open_side("twin-fla"), open_side("twin-flashinfer"), cases)
    assert saved["verdict"] == live.verdict == "explained"
    assert {s["knob"] for s in saved["switches"]} == {s["knob"] for s in live.switches} == {"inv_dtype", "bf16_output"}


# ---------------------------------------------------------------- plugin backends for the CLI tests

class _Unavailable(FLATwin):
    name = "test-unavailable"

    def available(self):
        return "no such device here"


class _PrefillOnly(FLATwin):
    name = "test-prefill-only"

    def supports(self, case):
        return None if case.op == "prefill" else "prefill only"


class _DecodeOnly(FLATwin):
    name = "test-decode-only"

    def supports(self, case):
        return None if case.op == "decode" else "decode only"


def _unavailable():
    return _Unavailable()


def _prefill_only():
    return _PrefillOnly()


def _decode_only():
    return _DecodeOnly()
