"""FLA's fused_recurrent kernel under Triton's CPU interpreter (backend ``fla-interp``) vs the oracle.

Runs in CI (fla-core and triton come with the ``test`` extra); if either is missing the tests
FAIL with the reason, they do not skip.

Error model.
- fp32 inputs: the kernel runs the recurrence in fp32. Its precision twin is the same recurrence
  evaluated token by token in fp32 with torch (below), raw gates evaluated in fp32 with FLA's
  formula (softplus as log(1 + exp(x)), which loses relative precision for x << 0); both differ from the float64 oracle by fp32
  rounding accumulated over the same operations, in a different order. Bound: rel_l2 <= 4 x the
  twin's rel_l2 (measured ~1x); a wrong gate, layout or dropped term is O(1), ~1e6 x larger.
- bf16 inputs/outputs: arithmetic stays fp32, so the error is the final fp32 -> bf16 store, which
  the interpreter truncates instead of rounding to nearest even: truncation error is uniform in
  [0, 1) ulp (rms ulp/sqrt(3)) against rounding's [-1/2, 1/2] (rms ulp/sqrt(12)), i.e. 2x the
  floor (the oracle rounded to bf16). Bound: 3 x floor (measured ~2.0x). bf16 pool rows are
  written by the adapter with round-to-nearest: bound 3 x their floor too.
"""
from __future__ import annotations

import os

import pytest
import torch

from gdncheck.backends.fla import FLAInterpreter
from gdncheck.data.case import Case
from gdncheck.inputs import DTYPES, materialize
from gdncheck.oracle import expected
from gdncheck_reference import OUT_ORACLE, ROW_UNTOUCHED, ROW_WRITTEN

EPS = 1e-6


@pytest.fixture(scope="module")
def backend():
    os.environ["TRITON_INTERPRET"] = "1"  # before FLA's kernels are built; never at collection time
    be = FLAInterpreter()
    why = be.available()
    if why:
        pytest.fail(f"fla-interp cannot run: {why}. Install the test extra: pip install -e '.[test]'")
    return be


def twin_fp32(inputs, policy_zero_pad=True):
    """The recurrence in fp32, token by token, V-last internally. Returns (o, final [N, HS, ...])."""
    c = inputs.case
    if c.gate_source == "raw":  # the kernel evaluates the gates in fp32 itself, as FLA's softplus
        x = inputs.a.float() + inputs.dt_bias.float()  # does: log(1 + exp(x)), not log1p
        sp = torch.where(x > 20.0, x, torch.log(1.0 + torch.exp(x)))
        g = -torch.exp(inputs.A_log.float()) * sp
        beta = torch.sigmoid(inputs.b.float())
    else:
        g, beta = inputs.g.float(), inputs.beta.float()
    q, k, v = inputs.q.float(), inputs.k.float(), inputs.v.float()
    if c.l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + EPS)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + EPS)
    scale = c.scale if c.scale is not None else c.K ** -0.5
    r = c.HV // c.H
    q, k = q.repeat_interleave(r, 2), k.repeat_interleave(r, 2)
    pool = inputs.state.float()
    reads = inputs.read_indices.tolist() if inputs.read_indices is not None else list(range(c.N))
    if c.op == "prefill":
        cu = inputs.cu_seqlens.tolist()
        spans = [(0, cu[n], cu[n + 1]) for n in range(c.N)]
    else:
        spans = [(n, 0, c.T) for n in range(c.N)]
    o = torch.zeros(c.B, c.T, c.HS, c.V)
    finals = []
    for n, (b, t0, t1) in enumerate(spans):
        S = torch.zeros(pool.shape[1:]) if reads[n] < 0 else pool[reads[n]].clone()
        if c.layout == "k_last":
            S = S.transpose(-1, -2)
        for t in range(t0, t1):
            S = S * torch.exp(g[b, t])[:, None, None]
            u = beta[b, t][:, None] * (v[b, t] - torch.einsum("hkv,hk->hv", S, k[b, t]))
            S = S + k[b, t][:, :, None] * u[:, None, :]
            o[b, t] = torch.einsum("hkv,hk->hv", S, q[b, t] * scale)
        if reads[n] < 0:
            o[b, t0:t1] = 0
        finals.append(S.transpose(-1, -2) if c.layout == "k_last" else S)
    return o, torch.stack(finals)


def _rel(x, ref):
    d = torch.nan_to_num(x.double() - ref, nan=float("inf"))
    return d.norm().item() / ref.norm().item()


SHAPES = [
    dict(op="prefill", seqlens=[5, 0, 6], layout="v_last", gate_source="precomputed"),
    dict(op="prefill", seqlens=[4, 7], layout="k_last", gate_source="raw", pool_size=6, read_indices=[4, 1]),
    dict(op="prefill", seqlens=[6, 3], layout="k_last", gate_source="precomputed", pool_size=5,
         read_indices=[2, -1], gate_dist="softplus_high"),
    dict(op="decode", seqlens=[1] * 4, layout="k_last", gate_source="raw", pool_size=8,
         read_indices=[3, -1, 5, 0], write_indices=[6, -1, 2, -1]),
    dict(op="decode", seqlens=[1] * 3, layout="v_last", gate_source="precomputed", pool_size=5,
         read_indices=[-1, 2, 4], l2norm=False, qk_scale=0.2, scale=0.3),
    dict(op="verify", seqlens=[3] * 2, layout="v_last", gate_source="raw", pool_size=4, read_indices=[1, 3],
         disable_state_update=True),
    dict(op="verify", seqlens=[4] * 2, layout="k_last", gate_source="precomputed", gate_dist="alpha_tiny"),
]


@pytest.mark.parametrize("shape,seed", [(s, 3 + 7 * i) for i, s in enumerate(SHAPES)],
                         ids=lambda x: f"{x['op']}-{x['layout']}-{x['gate_source']}" if isinstance(x, dict) else str(x))
def test_fp32_matches_oracle_within_twin(backend, shape, seed):
    case = Case(H=2, HV=4, K=16, V=32, dtype="float32", gate_dtype="float32", seed=seed, **shape)
    assert backend.supports(case) is None, backend.supports(case)
    inp = materialize(case)
    before = inp.clone()
    exp = expected(before, backend.policy(case), backend.zero_length_policy)
    out = backend.run(inp)
    twin_o, twin_final = twin_fp32(before)

    m = exp.o_class == OUT_ORACLE
    ref = exp.o[m]
    assert not torch.isnan(out.o[m]).any(), "output left unwritten"
    err, twin = _rel(out.o[m], ref), _rel(twin_o[m], ref)
    assert err <= 4 * twin, f"[{out.path}] o rel_l2 {err:.3e} > 4 x fp32 twin {twin:.3e}"

    w, u = exp.row_class == ROW_WRITTEN, exp.row_class == ROW_UNTOUCHED
    for i in torch.nonzero(u).flatten().tolist():
        assert torch.equal(out.state[i], before.state[i]), f"untouched pool row {i} changed"
    if w.any():
        rows = torch.nonzero(w).flatten().tolist()
        writes = (case.write_indices or case.read_indices) if case.pool_size else list(range(case.N))
        seq_of = {wr: n for n, wr in enumerate(writes)}
        tw = torch.stack([twin_final[seq_of[i]] for i in rows])
        serr, stwin = _rel(out.state[w], exp.pool[w]), _rel(tw, exp.pool[w])
        assert serr <= 4 * stwin, f"state rel_l2 {serr:.3e} > 4 x twin {stwin:.3e}"
    if case.padded_rows:  # policy skip: the padded sequence's tokens are zero
        cu = before.cu_seqlens.tolist() if case.op == "prefill" else None
        for n in case.padded_rows:
            o_n = out.o[0, cu[n]:cu[n + 1]] if cu else out.o[n]
            assert (o_n == 0).all(), "padding policy skip: padded output must be zero"


@pytest.mark.parametrize("layout,seed", [("k_last", 5), ("v_last", 29)])
def test_bf16_truncation_model(backend, layout, seed):
    case = Case(op="verify", seqlens=[3] * 2, H=2, HV=4, K=16, V=32, dtype="bfloat16", state_dtype="bfloat16",
                layout=layout, gate_source="raw", pool_size=4, read_indices=[1, 2], seed=seed)
    inp = materialize(case)
    before = inp.clone()
    exp = expected(before, backend.policy(case), backend.zero_length_policy)
    out = backend.run(inp)
    dt = DTYPES[case.dtype]
    ref = exp.o
    err, floor = _rel(out.o, ref), _rel(ref.to(dt), ref)
    assert err <= 3 * floor, f"o rel_l2 {err:.3e} > 3 x bf16 floor {floor:.3e}"
    w = exp.row_class == ROW_WRITTEN
    sref = exp.pool[w]
    serr, sfloor = _rel(out.state[w], sref), _rel(sref.to(torch.bfloat16), sref)
    assert serr <= 3 * sfloor, f"state rel_l2 {serr:.3e} > 3 x bf16 floor {sfloor:.3e}"
    assert torch.equal(out.state[0], before.state[0]) and torch.equal(out.state[3], before.state[3])


def test_wrong_layout_flag_is_caught(backend):
    """Negative control: the wrong layout flag must fail the bound by orders of magnitude."""
    case = Case(op="decode", seqlens=[1] * 2, H=2, HV=4, K=16, V=16, dtype="float32", layout="k_last",
                pool_size=3, read_indices=[2, 1], seed=11)
    inp = materialize(case)
    before = inp.clone()
    wrong = inp.clone()
    wrong.case = case.model_copy(update={"layout": "v_last"})  # the adapter passes state_v_first=False
    out = backend.run(wrong)
    exp = expected(before, "skip")
    assert _rel(out.o, exp.o) > 1e-2
