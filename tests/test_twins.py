"""Precision twins: error model against the float64 oracle, pools and padding, knobs, speed.

Error model (measured on the cases below, seeds 1-3, this machine):

- fp32 inputs, fp32 state: rel_l2(twin - oracle) <= 6 eps32 on every fp32 path (decode/verify
  1.4-2.5 eps, FLA chunk prefill 2.7-5.9 eps); bound 16 eps32. FlashInfer's prefill inverts
  the block matrix in fp16: 0.03-0.17 u16 (u16 = 2^-11); bound 0.5 u16.
- bf16 inputs: output error / floor, floor = rel_l2(oracle rounded to bf16, oracle): 1.00
  on decode/verify (the fp32 recurrence then one rounding), 2.4-2.65 on chunked prefill (q/k,
  w, u, h, v_new stored in bf16); accepted band 0.5-5.
"""
from __future__ import annotations

import time

import pytest
import torch

from gdncheck.backends import load_backend
from gdncheck.backends.twins import FLATwin, FlashInferTwin
from gdncheck.data.case import Case
from gdncheck.inputs import materialize
from gdncheck.oracle import expected
from gdncheck_reference import OUT_CALLER, OUT_ORACLE, ROW_UNTOUCHED, ROW_WRITTEN




EPS32 = torch.finfo(torch.float32).eps
U16 = 2.0 ** -11
TWINS = [FLATwin, FlashInferTwin]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    n = b.norm().item()
    return (a - b).norm().item() / (n if n > 0 else 1.0)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.contiguous(), b.contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def run(twin, case):
    """(inputs before the call, outputs, oracle expectation under the twin's policy)."""
    inp = materialize(case)
    before = inp.clone()
    out = twin.run(inp)
    return before, out, expected(before, twin.policy(case))


def precision_cases(dtype: str, seed: int) -> list[Case]:
    return [
        Case(op="prefill", seqlens=[100, 37, 200], H=2, HV=4, K=32, V=32, dtype=dtype, seed=seed, gate_source="raw"),
        Case(op="prefill", seqlens=[300], H=2, HV=4, K=64, V=64, dtype=dtype, seed=seed, layout="v_last"),
        Case(op="decode", seqlens=[1] * 4, H=2, HV=4, K=64, V=64, dtype=dtype, seed=seed),
        Case(op="verify", seqlens=[8] * 3, H=2, HV=4, K=64, V=64, dtype=dtype, seed=seed, intermediate=True,
             gate_source="raw"),
    ]


@pytest.mark.parametrize("seed", [1, 7])
@pytest.mark.parametrize("T", TWINS, ids=lambda t: t.name)
def test_fp32_error_within_eps_bound(T, seed):
    for case in precision_cases("float32", seed):
        tw = T()
        _, out, e = run(tw, case)
        bound = 0.5 * U16 if (T is FlashInferTwin and case.op == "prefill") else 16 * EPS32
        assert rel(out.o, e.o) <= bound, (case.op, rel(out.o, e.o) / EPS32)
        assert rel(out.state, e.pool) <= bound, (case.op, rel(out.state, e.pool) / EPS32)
        if case.intermediate:
            assert rel(out.intermediate, e.intermediate) <= bound


@pytest.mark.parametrize("seed", [2, 11])
@pytest.mark.parametrize("T", TWINS, ids=lambda t: t.name)
def test_bf16_output_error_near_floor(T, seed):
    for case in precision_cases("bfloat16", seed):
        _, out, e = run(T(), case)
        floor = rel(e.o.to(torch.bfloat16), e.o)
        ratio = rel(out.o, e.o) / floor
        assert 0.5 <= ratio <= 5.0, (case.op, ratio)
        # the state stays fp32: its error is the inputs' (prefill stores in bf16) or fp32's
        sb = 2 * 2.0 ** -8 if case.op == "prefill" else 16 * EPS32
        assert rel(out.state, e.pool) <= sb, (case.op, rel(out.state, e.pool))


def _check_against_oracle(tw, case, before, out, e):
    """Row and token classes of the oracle: untouched rows and caller tokens bit-identical,
    written rows and oracle tokens within the bf16/fp32 error model."""
    u_in = {"float32": EPS32, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}[case.dtype]
    u_st = {"float32": EPS32, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}[case.state_dtype]
    tol = 4 * max(u_in, u_st) + (0.5 * U16 if isinstance(tw, FlashInferTwin) and case.op == "prefill" else 0)
    pool = out.state
    for r in torch.nonzero(e.row_class == ROW_UNTOUCHED).flatten().tolist():
        assert bits_equal(pool[r], before.state[r]), f"untouched row {r} modified"
    w = torch.nonzero(e.row_class == ROW_WRITTEN).flatten()
    if len(w):
        assert rel(pool[w], e.pool[w]) <= tol
    oc = e.o_class
    o = out.o
    if (oc == OUT_CALLER).any():
        assert bits_equal(o[oc == OUT_CALLER], before.out[oc == OUT_CALLER])
    live = oc == OUT_ORACLE
    assert not torch.isnan(o[live]).any()
    assert rel(o[live], e.o[live]) <= tol + 4 * u_in
    if case.intermediate:
        assert rel(out.intermediate, e.intermediate) <= tol


POOL_CASES = [
    Case(op="decode", seqlens=[1] * 4, H=2, HV=4, K=16, V=16, pool_size=10, read_indices=[3, -1, 7, 1],
         gate_source="raw", seed=21),
    Case(op="decode", seqlens=[1] * 4, H=2, HV=4, K=16, V=16, pool_size=10, read_indices=[3, -1, 7, 1],
         state_dtype="bfloat16", layout="v_last", seed=22),
    Case(op="decode", seqlens=[1] * 3, H=2, HV=4, K=16, V=16, pool_size=8, read_indices=[1, 2, 3],
         write_indices=[4, -1, 5], seed=23),
    Case(op="verify", seqlens=[5] * 3, H=2, HV=4, K=16, V=16, dtype="float32", pool_size=8,
         read_indices=[2, -1, 6], write_indices=[3, -1, 7], intermediate=True, seed=24),
    Case(op="verify", seqlens=[3] * 2, H=2, HV=4, K=16, V=16, pool_size=6, read_indices=[4, 1],
         disable_state_update=True, intermediate=True, layout="v_last", seed=25),
    Case(op="prefill", seqlens=[0, 65, 0, 3], H=2, HV=4, K=16, V=16, pool_size=10,
         read_indices=[1, 2, 3, 4], write_indices=[5, 6, 7, 8], gate_source="raw", seed=26),
    Case(op="prefill", seqlens=[70, 5], H=4, HV=2, K=16, V=16, pool_size=6, read_indices=[5, 0],
         state_dtype="float16", pool_strided=True, gate_strided=True, gate_source="raw", layout="v_last",
         seed=27),
    Case(op="verify", seqlens=[4] * 2, H=1, HV=3, K=16, V=8, l2norm=False, scale=0.2, state_dtype="bfloat16",
         intermediate=True, seed=28),
    Case(op="prefill", seqlens=[0, 0], H=2, HV=2, K=8, V=8, pool_size=4, read_indices=[1, 2],
         write_indices=[3, 0], seed=29),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: f"{c.op}-{c.seed}")
@pytest.mark.parametrize("T", TWINS, ids=lambda t: t.name)
def test_pools_and_padding_follow_policy(T, case):
    tw = T()
    assert tw.supports(case) is None
    before, out, e = run(tw, case)
    _check_against_oracle(tw, case, before, out, e)
    for n in case.padded_rows:
        if tw.policy(case) == "skip":
            assert torch.all(out.o[n] == 0)


def test_family_policies():
    fi, fla = FlashInferTwin(), FLATwin()
    c = lambda **kw: Case(**{"op": "decode", "seqlens": [1, 1], "pool_size": 4, "read_indices": [1, -1], **kw})  # noqa: E731
    assert fi.policy(c()) == "skip"
    assert fi.policy(c(state_dtype="bfloat16")) == "null_slot"
    assert fi.policy(c(op="verify", seqlens=[3, 3])) == "caller_value"
    assert fi.policy(c(op="prefill")) == "skip"
    assert {fla.policy(c(op=op, seqlens=s)) for op, s in
            (("decode", [1, 1]), ("verify", [3, 3]), ("prefill", [4, 0]))} == {"skip"}
    # a case naming a policy gets it; the override knob changes the default
    assert fla.policy(c(padding="caller_value")) == "caller_value"
    assert FLATwin(padding={"decode": "null_slot"}).policy(c()) == "null_slot"
    case = c(op="verify", seqlens=[3, 3], padding="null_slot", read_indices=[1, -1], intermediate=True)
    before, out, e = run(fla, case)
    _check_against_oracle(fla, case, before, out, e)


def test_registry_and_caps():
    for name, T in (("twin-fla", FLATwin), ("twin-flashinfer", FlashInferTwin)):
        b = load_backend(name)
        assert isinstance(b, T) and b.name == name and b.caps.device == "any"
        assert b.caps.ops == {"prefill", "decode", "verify"}


def _beta_case(seed):
    # fp32 inputs and a long verify: beta's rounding is far above the twin's fp32 error
    return Case(op="verify", seqlens=[16] * 4, H=2, HV=4, K=32, V=32, dtype="float32", gate_source="raw",
                intermediate=True, seed=seed)


@pytest.mark.parametrize("seed", [3, 5])
def test_beta_dtype_knob(seed):
    case = _beta_case(seed)
    _, clean, e = run(FlashInferTwin(), case)
    _, rounded, _ = run(FlashInferTwin(beta_dtype="bfloat16"), case)
    err_clean, err_round = rel(clean.o, e.o), rel(rounded.o, e.o)
    assert err_round > 100 * err_clean, (err_clean, err_round)
    # the oracle's own beta ablation reproduces the rounded twin at fp32 level
    e_ab = expected(materialize(case), "caller_value", beta_dtype=torch.bfloat16)
    assert rel(rounded.o, e_ab.o) <= 16 * EPS32
    # fp16 rounding is finer than bf16
    _, r16, _ = run(FlashInferTwin(beta_dtype="float16"), case)
    assert err_clean < rel(r16.o, e.o) < err_round


@pytest.mark.parametrize("seed", [4, 6])
def test_exp_dtype_knob(seed):
    case = _beta_case(seed)
    for T in TWINS:
        _, clean, e = run(T(), case)
        _, b16, _ = run(T(exp_dtype="bfloat16"), case)
        assert rel(b16.o, e.o) > 100 * rel(clean.o, e.o)
        e_ab = expected(materialize(case), T().policy(case), exp_dtype=torch.bfloat16)
        assert rel(b16.o, e_ab.o) <= 16 * EPS32


def test_other_knobs():
    case = Case(op="prefill", seqlens=[80, 20], H=2, HV=4, K=32, V=32, gate_source="raw", seed=8)
    _, ref, e = run(FLATwin(), case)
    _, fm, _ = run(FLATwin(fast_math=True), case)
    _, st16, _ = run(FLATwin(state_dtype="bfloat16"), case)
    _, f64, _ = run(FLATwin(compute_dtype="float64"), case)
    floor = rel(e.o.to(torch.bfloat16), e.o)
    for o in (fm, st16, f64):  # fast-math moves the fp32 state by ~1e-9, below the bf16 output
        assert not bits_equal(o.state, ref.state)
        assert rel(o.o, e.o) <= 5 * floor
    assert rel(st16.state, e.pool) > rel(ref.state, e.pool)
    # the chunk path stores normalised q/k in the input dtype anyway: where the norm is taken
    # does not matter there, while the fp32 recurrence sees the adapter's rounding
    _, adapter_norm, _ = run(FLATwin(l2norm_in_kernel=False), case)
    assert bits_equal(adapter_norm.o, ref.o)
    dec = Case(op="verify", seqlens=[6] * 2, H=2, HV=4, K=32, V=32, dtype="float32", seed=8)
    dec_bf = dec.model_copy(update={"dtype": "bfloat16"})
    _, r_in, e_dec = run(FLATwin(), dec_bf)
    _, r_ad, _ = run(FLATwin(l2norm_in_kernel=False), dec_bf)
    assert not bits_equal(r_in.state, r_ad.state)
    assert rel(r_in.state, e_dec.pool) < rel(r_ad.state, e_dec.pool) <= 4 * 2.0 ** -8
    with pytest.raises(ValueError, match="exp_dtype"):
        FLATwin(exp_dtype="int8")


def test_fp16_inputs_on_flashinfer_decode_round_to_bf16():
    case = Case(op="decode", seqlens=[1] * 3, H=2, HV=4, K=32, V=32, dtype="float16", seed=9)
    _, out, e = run(FlashInferTwin(), case)
    assert out.o.dtype == torch.float16
    # the output went through bf16: its values are bf16-representable
    assert bits_equal(out.o.to(torch.bfloat16).to(torch.float16), out.o)
    _, fla, _ = run(FLATwin(), case)
    assert rel(fla.o, e.o) < rel(out.o, e.o)


def test_speed():
    """Decode B=8, HV=32, K=V=128 well under 1 s; prefill T=512 in a couple of seconds.
    Measured on 2 idle cores: decode 0.05 s, prefill 0.13-0.15 s (best of two, after a warm-up)."""
    dec = Case(op="decode", seqlens=[1] * 8, H=16, HV=32, K=128, V=128, seed=1)
    pre = Case(op="prefill", seqlens=[512], H=16, HV=32, K=128, V=128, seed=1)
    for T in TWINS:
        for case, limit in ((dec, 1.0), (pre, 3.0)):
            inp = materialize(case)
            T().run(inp.clone())
            best = float("inf")
            for _ in range(2):
                x = inp.clone()
                t0 = time.perf_counter()
                T().run(x)
                best = min(best, time.perf_counter() - t0)
            assert best < limit, f"{T.name} {case.op}: {best:.2f} s"
