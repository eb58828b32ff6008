"""The oracle proves itself: chunked == recurrent, and both == an independent scalar loop.

* ``chunked`` vs ``recurrent`` on random cases drawn by Hypothesis (GVA ratios 2 and 3,
  GQA, varlen with zero-length sequences, non-zero initial states, both layouts,
  intermediate states, T not a multiple of the chunk, strided and low-precision inputs).
* A scalar loop written here in plain Python floats from the gated delta rule's definition (gates from raw
  ``A_log, a, dt_bias, b``; L2 norm with eps 1e-6; default scale ``K ** -0.5``; GVA/GQA head
  maps; varlen) against the oracle, plain and pooled (padding, policies, intermediates).

Tolerance: ``max|x - ref| <= 1e-12 * max|ref|`` per tensor.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from gdncheck_reference import (
    LAYOUTS,
    OUT_CALLER,
    OUT_ORACLE,
    OUT_UNDEFINED,
    PADDING_POLICIES,
    ROW_UNDEFINED,
    ROW_UNTOUCHED,
    ROW_WRITTEN,
    ZERO_LENGTH_POLICIES,
    compute_gates,
    gated_delta_rule,
    pooled_gated_delta_rule,
)

F64 = torch.float64


RTOL = 1e-12
# (H, HV): MHA, GVA r = 2 and 3 (scaled-down and the real 16/32, 16/48), GQA r = 2 and 3.
HEADS = [(1, 1), (2, 4), (2, 6), (1, 3), (16, 32), (16, 48), (4, 2), (6, 2), (3, 1)]
CHUNKS = [4, 8, 16, 64]


def assert_rel(x: torch.Tensor, ref: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """``max|x - ref| <= rtol * max|ref|`` (exact match when ref is all zero)."""
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    err = (x.to(F64) - ref.to(F64)).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:g} * max|ref| ({scale:.3e})"


# --------------------------------------------------------------------------------------
# chunked == recurrent
# --------------------------------------------------------------------------------------

@st.composite
def gdn_cases(draw):
    H, HV = draw(st.sampled_from(HEADS))
    big = H >= 16
    K = draw(st.sampled_from([4, 8] if big else [4, 8, 12, 16]))
    V = draw(st.sampled_from([4, 8] if big else [4, 8, 12, 16]))
    max_T = 24 if big else 70
    if draw(st.booleans()):  # packed varlen, zero-length sequences allowed
        lens = draw(st.lists(st.integers(0, max_T // 2), min_size=1, max_size=4))
        B, T, cu = 1, sum(lens), lens
    else:
        B, T, cu = draw(st.integers(1, 3)), draw(st.integers(0, max_T)), None
    return dict(
        H=H, HV=HV, K=K, V=V, B=B, T=T, cu=cu,
        chunk=draw(st.sampled_from(CHUNKS)),
        layout=draw(st.sampled_from(LAYOUTS)),
        init=draw(st.booleans()),
        l2=draw(st.booleans()),
        inter=draw(st.booleans()),
        gates=draw(st.sampled_from(["mild", "strong", "zero", "forget"])),
        scale=draw(st.sampled_from([None, 0.0, 0.37])),
        dtype=draw(st.sampled_from([F64, F64, torch.float32, torch.bfloat16])),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_inputs(c: dict) -> dict:
    """Random tensors for a case from :func:`gdn_cases`. Keys have norm <= 1 without L2 norm,
    so that the delta rule stays a contraction and both forms stay well conditioned."""
    gen = torch.Generator().manual_seed(c["seed"])
    H, HV, K, V, B, T = c["H"], c["HV"], c["K"], c["V"], c["B"], c["T"]
    HS = max(H, HV)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    def place(x):  # optionally a strided (non-contiguous) view with the same values
        if not c["strided"]:
            return x.to(c["dtype"])
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=c["dtype"])
        wide[..., ::2] = x
        return wide[..., ::2]

    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, HV, V)
    if not c["l2"]:
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-3) * torch.rand(B, T, H, 1, generator=gen, dtype=F64)
    u = torch.rand(B, T, HS, generator=gen, dtype=F64)
    g = {"mild": -0.3 * u, "strong": -12.0 * u, "zero": torch.zeros_like(u),
         "forget": torch.where(u < 0.2, torch.full_like(u, -float("inf")),
                               torch.where(u < 0.4, torch.full_like(u, -1e3), -u))}[c["gates"]]
    beta = torch.rand(B, T, HS, generator=gen, dtype=F64)
    beta[beta < 0.1] = 0.0
    beta[beta > 0.9] = 1.0
    N = len(c["cu"]) if c["cu"] is not None else B
    S0 = None
    if c["init"]:
        S0 = rnd(N, HS, K, V)
        if c["layout"] == "k_last":
            S0 = S0.transpose(-1, -2).contiguous()
    cu = None
    if c["cu"] is not None:
        cu = torch.tensor([0] + list(c["cu"]), dtype=torch.int64).cumsum(0)
    return dict(q=place(q), k=place(k), v=place(v), g=place(g), beta=place(beta), initial_state=S0,
                cu_seqlens=cu, scale=c["scale"], use_qk_l2norm=c["l2"], layout=c["layout"],
                output_intermediate=c["inter"])


def check_forms(c: dict) -> None:
    kw = make_inputs(c)
    rec = gated_delta_rule(**kw, form="recurrent")
    chk = gated_delta_rule(**kw, form="chunked", chunk_size=c["chunk"])
    assert rec.o.dtype == chk.o.dtype == F64
    assert_rel(chk.o, rec.o, "o")
    assert_rel(chk.final_state, rec.final_state, "final_state")
    if c["inter"]:
        assert_rel(chk.intermediate, rec.intermediate, "intermediate")
        # the last intermediate state of each sequence is its final state
        cu = kw["cu_seqlens"]
        ends = [(0, int(e) - 1) for e in cu[1:]] if cu is not None else [(b, c["T"] - 1) for b in range(c["B"])]
        for n, (b, t) in enumerate(ends):
            starts_empty = cu is not None and int(cu[n]) == int(cu[n + 1])
            if t >= 0 and not starts_empty:
                assert torch.equal(rec.intermediate[b, t], rec.final_state[n])
    else:
        assert rec.intermediate is None and chk.intermediate is None
    HS = max(c["H"], c["HV"])
    assert rec.o.shape == (c["B"], c["T"], HS, c["V"])


_BASE = dict(H=2, HV=4, K=8, V=8, B=1, T=37, cu=None, chunk=16, layout="v_last", init=True, l2=True,
             inter=True, gates="mild", scale=None, dtype=F64, strided=False, seed=1)


@given(gdn_cases())
@example(dict(_BASE))
@example(dict(_BASE, H=16, HV=48, K=4, V=8, T=13, chunk=4, layout="k_last"))
@example(dict(_BASE, H=6, HV=2, B=1, T=21, cu=[0, 5, 0, 16, 0], chunk=8, gates="forget"))
@example(dict(_BASE, T=0, cu=None, B=2))
@example(dict(_BASE, cu=[0, 0], T=0))
def test_chunked_equals_recurrent(case):
    check_forms(case)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("heads", [(16, 32), (16, 48), (2, 6), (6, 2)])
def test_chunked_equals_recurrent_grid(chunk, heads):
    """Every chunk size against every head ratio, T one past a multiple of the chunk, varlen."""
    H, HV = heads
    T1 = chunk + 3 if chunk < 64 else 67
    case = dict(_BASE, H=H, HV=HV, K=4, V=8, T=T1 + 5, cu=[T1, 0, 5], chunk=chunk,
                layout="k_last", gates="strong", seed=chunk * 100 + H)
    check_forms(case)


def test_chunk_size_does_not_matter():
    """Different chunk sizes are the same function (to rounding)."""
    kw = make_inputs(dict(_BASE, T=50, seed=7))
    ref = gated_delta_rule(**kw, form="chunked", chunk_size=1)
    for C in (3, 4, 7, 16, 49, 50, 64, 1000):
        res = gated_delta_rule(**kw, form="chunked", chunk_size=C)
        assert_rel(res.o, ref.o, f"o (C={C})")
        assert_rel(res.final_state, ref.final_state, f"final_state (C={C})")
        assert_rel(res.intermediate, ref.intermediate, f"intermediate (C={C})")


def test_inputs_are_not_modified():
    kw = make_inputs(dict(_BASE, layout="k_last", l2=False))
    before = {n: t.clone() for n, t in kw.items() if isinstance(t, torch.Tensor)}
    for form in ("chunked", "recurrent"):
        res = gated_delta_rule(**kw, form=form)
        for n, t in before.items():
            assert torch.equal(kw[n], t), f"{form} modified {n}"
        res.final_state.add_(1.0)  # results never alias the inputs
        assert torch.equal(kw["initial_state"], before["initial_state"])
    # T == 0: final_state equals initial_state but is a copy
    kw0 = make_inputs(dict(_BASE, T=0))
    res = gated_delta_rule(**kw0)
    assert torch.equal(res.final_state, kw0["initial_state"])
    assert res.final_state.data_ptr() != kw0["initial_state"].data_ptr()


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_non_finite_token_stays_in_its_sequence(form):
    """An inf in the first packed token must not reach the other (shorter) sequences."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 7, 1, 4, generator=gen, dtype=F64)
    v = torch.randn(1, 7, 1, 4, generator=gen, dtype=F64)
    v[0, 0, 0, 0] = float("inf")
    g, beta = -torch.rand(1, 7, 1, generator=gen, dtype=F64), torch.rand(1, 7, 1, generator=gen, dtype=F64)
    cu = torch.tensor([0, 5, 7])
    res = gated_delta_rule(q, q, v, g, beta, cu_seqlens=cu, use_qk_l2norm=True, form=form, chunk_size=4,
                           output_intermediate=True)
    alone = gated_delta_rule(q[:, 5:], q[:, 5:], v[:, 5:], g[:, 5:], beta[:, 5:], use_qk_l2norm=True, form=form)
    assert torch.isfinite(res.final_state[1]).all() and torch.isfinite(res.o[0, 5:]).all()
    assert_rel(res.final_state[1], alone.final_state[0], "final_state of the clean sequence")
    assert_rel(res.o[0, 5:], alone.o[0], "o of the clean sequence")


# --------------------------------------------------------------------------------------
# An independent scalar model, in plain Python floats
# --------------------------------------------------------------------------------------

def s_softplus(x: float) -> float:
    return x if x > 20.0 else math.log1p(math.exp(x))


def s_sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def s_l2norm(x: list[float]) -> list[float]:
    n = math.sqrt(sum(t * t for t in x) + 1e-6)
    return [t / n for t in x]


def scalar_gdn(q, k, v, A_log, a, dt_bias, b, lens, S0, scale, l2):
    """The gated delta rule token by token, one state head at a time.

    q, k: ``[Ttot][H][K]``; v: ``[Ttot][HV][V]``; a, b: ``[Ttot][HS]``; A_log, dt_bias: ``[HS]``;
    lens: sequence lengths, packed one after the other; S0: ``[N][HS][K][V]`` (v_last).
    Returns o ``[Ttot][HS][V]``, final ``[N][HS][K][V]``, inter ``[Ttot][HS][K][V]``.
    """
    H, HV = len(q[0]) if q else 0, len(v[0]) if v else 0
    HS, K, V = len(A_log), len(S0[0][0]), len(S0[0][0][0])
    Ttot = sum(lens)
    o = [[[0.0] * V for _ in range(HS)] for _ in range(Ttot)]
    inter = [[None] * HS for _ in range(Ttot)]
    final = []
    start = 0
    for n, L in enumerate(lens):
        fin_n = []
        for h in range(HS):
            qh = h // (HS // H) if Ttot else 0   # GVA: value head h reads q/k head h // r
            vh = h // (HS // HV) if Ttot else 0  # GQA: state head h reads value head h // r
            S = [row[:] for row in S0[n][h]]
            for t in range(start, start + L):
                g = -math.exp(A_log[h]) * s_softplus(a[t][h] + dt_bias[h])
                alpha = math.exp(g)
                beta = s_sigmoid(b[t][h])
                qt, kt = q[t][qh], k[t][qh]
                if l2:
                    qt, kt = s_l2norm(qt), s_l2norm(kt)
                qt = [x * scale for x in qt]
                S = [[alpha * S[i][j] for j in range(V)] for i in range(K)]
                kS = [sum(kt[i] * S[i][j] for i in range(K)) for j in range(V)]
                u = [beta * (v[t][vh][j] - kS[j]) for j in range(V)]
                S = [[S[i][j] + kt[i] * u[j] for j in range(V)] for i in range(K)]
                o[t][h] = [sum(qt[i] * S[i][j] for i in range(K)) for j in range(V)]
                inter[t][h] = [row[:] for row in S]
            fin_n.append(S)
        final.append(fin_n)
        start += L
    return o, final, inter


@st.composite
def scalar_cases(draw):
    H, HV = draw(st.sampled_from([(1, 1), (1, 2), (1, 3), (2, 4), (2, 1), (3, 1)]))
    return dict(
        H=H, HV=HV, K=draw(st.integers(1, 4)), V=draw(st.integers(1, 4)),
        lens=draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)),
        varlen=draw(st.booleans()),
        l2=draw(st.booleans()),
        scale=draw(st.sampled_from([None, 0.5])),
        layout=draw(st.sampled_from(LAYOUTS)),
        init=draw(st.booleans()),
        big_a=draw(st.booleans()),  # drive a + dt_bias over the softplus threshold
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def scalar_inputs(c: dict) -> dict:
    rng = random.Random(c["seed"])
    H, HV, K, V = c["H"], c["HV"], c["K"], c["V"]
    HS = max(H, HV)
    if not c["varlen"]:  # a batch: every sequence has the same length
        c = dict(c, lens=[c["lens"][0]] * len(c["lens"]))
    lens = c["lens"]
    Ttot, N = sum(lens), len(lens)

    def r(lo=-1.0, hi=1.0):
        return rng.uniform(lo, hi)

    q = [[[r() for _ in range(K)] for _ in range(H)] for _ in range(Ttot)]
    k = [[[r() for _ in range(K)] for _ in range(H)] for _ in range(Ttot)]
    if not c["l2"]:  # keep |k| <= 1
        k = [[[x / (2.0 * math.sqrt(K)) for x in kh] for kh in kt] for kt in k]
    v = [[[r(-2, 2) for _ in range(V)] for _ in range(HV)] for _ in range(Ttot)]
    A_log = [r(-2.0, 1.0) for _ in range(HS)]
    dt_bias = [r(-1.0, 1.0) for _ in range(HS)]
    a = [[(r(19.0, 22.0) if c["big_a"] and rng.random() < 0.5 else r(-4.0, 3.0)) for _ in range(HS)]
         for _ in range(Ttot)]
    b = [[r(-5.0, 5.0) for _ in range(HS)] for _ in range(Ttot)]
    S0 = [[[[r() if c["init"] else 0.0 for _ in range(V)] for _ in range(K)] for _ in range(HS)]
          for _ in range(N)]
    scale = c["scale"] if c["scale"] is not None else K ** -0.5
    return dict(q=q, k=k, v=v, A_log=A_log, a=a, dt_bias=dt_bias, b=b, lens=lens, S0=S0, scale=scale,
                l2=c["l2"], varlen=c["varlen"], H=H, HV=HV)


def to_torch(x: dict, batch: bool):
    """Scalar inputs -> oracle tensors: packed ``[1, Ttot, ...]`` or batched ``[N, T, ...]``."""
    N, lens = len(x["lens"]), x["lens"]
    t = lambda lst: torch.tensor(lst, dtype=F64)  # noqa: E731
    H, HV = x["H"], x["HV"]
    K, V = len(x["S0"][0][0]), len(x["S0"][0][0][0])
    HS = len(x["A_log"])
    Ttot = sum(lens)
    q = t(x["q"]).view(Ttot, H, K)
    k = t(x["k"]).view(Ttot, H, K)
    v = t(x["v"]).view(Ttot, HV, V)
    a = t(x["a"]).view(Ttot, HS)
    b = t(x["b"]).view(Ttot, HS)
    shape = (N, lens[0]) if batch else (1, Ttot)
    q, k, v, a, b = (y.reshape(*shape, *y.shape[1:]) for y in (q, k, v, a, b))
    cu = None if batch else torch.tensor([0] + lens).cumsum(0)
    return q, k, v, a, b, t(x["A_log"]), t(x["dt_bias"]), t(x["S0"]), cu


def flat_tokens(o: torch.Tensor) -> torch.Tensor:
    """``[B, T, ...]`` -> ``[B*T, ...]``: batched sequences lie one after the other, as packed."""
    return o.reshape(-1, *o.shape[2:])


@given(scalar_cases())
@example(dict(H=2, HV=4, K=3, V=2, lens=[4, 0, 6], varlen=True, l2=True, scale=None, layout="k_last",
              init=True, big_a=True, seed=3))
@example(dict(H=3, HV=1, K=4, V=4, lens=[5, 5], varlen=False, l2=False, scale=0.5, layout="v_last",
              init=True, big_a=False, seed=4))
def test_scalar_loop_matches_oracle(c):
    x = scalar_inputs(c)
    batch = not x["varlen"]
    o_s, fin_s, inter_s = scalar_gdn(x["q"], x["k"], x["v"], x["A_log"], x["a"], x["dt_bias"], x["b"],
                                     x["lens"], x["S0"], x["scale"], x["l2"])
    q, k, v, a, b, A_log, dt_bias, S0, cu = to_torch(x, batch)
    g, _, beta = compute_gates(A_log, a, dt_bias, b)
    lay = c["layout"]
    init = S0 if lay == "v_last" else S0.transpose(-1, -2).contiguous()
    want_o, want_fin = torch.tensor(o_s, dtype=F64), torch.tensor(fin_s, dtype=F64)
    for form, C in (("recurrent", 64), ("chunked", 2), ("chunked", 64)):
        res = gated_delta_rule(q, k, v, g, beta, scale=c["scale"], initial_state=init, cu_seqlens=cu,
                               use_qk_l2norm=x["l2"], layout=lay, output_intermediate=True, form=form,
                               chunk_size=C)
        fin = res.final_state if lay == "v_last" else res.final_state.transpose(-1, -2)
        inter = res.intermediate if lay == "v_last" else res.intermediate.transpose(-1, -2)
        assert_rel(flat_tokens(res.o), want_o.view(-1, *res.o.shape[2:]), f"o ({form})")
        assert_rel(fin, want_fin, f"final_state ({form})")
        if sum(x["lens"]):
            want_inter = torch.tensor(inter_s, dtype=F64)
            assert_rel(flat_tokens(inter), want_inter, f"intermediate ({form})")


# ---- pooled, against a scalar model of the pool semantics ---------------------------------

@st.composite
def pooled_scalar_cases(draw):
    c = draw(scalar_cases())
    N = len(c["lens"])
    P = draw(st.integers(N + 1, N + 4))
    policy = draw(st.sampled_from(PADDING_POLICIES))
    # Slot 0 is the null slot under null_slot: live sequences use slots >= 1 there.
    first = 1 if policy == "null_slot" else 0
    slots = list(range(first, P))
    perm = draw(st.permutations(slots))  # distinct live read slots; -1 = padded row
    reads = [perm[n] if draw(st.integers(0, 3)) else -1 for n in range(N)]
    separate = draw(st.booleans())
    writes = None
    if separate:  # distinct live write slots, independent of the read slots; -1 = no write
        perm = draw(st.permutations(slots))
        writes = [w if draw(st.integers(0, 4)) else -1 for w in perm[:N]]
        if len(writes) < N:
            writes += [-1] * (N - len(writes))
    return dict(c, P=P, policy=policy, reads=reads, writes=writes,
                zero_length=draw(st.sampled_from(ZERO_LENGTH_POLICIES)),
                disable=draw(st.booleans()), varlen=True, init=True)


def scalar_pool(x, reads, writes, policy, zero_length, disable, pool_s, out_init):
    """Expected (o, o_class, pool, row_class) from the pool semantics, sequence by sequence."""
    N, lens = len(x["lens"]), x["lens"]
    writes = reads if writes is None else writes
    HS, K, V = len(pool_s[0]), len(pool_s[0][0]), len(pool_s[0][0][0])
    zero = [[[0.0] * V for _ in range(K)] for _ in range(HS)]
    src = []
    for n in range(N):
        if reads[n] >= 0:
            src.append(pool_s[reads[n]])
        else:
            src.append(pool_s[0] if policy == "null_slot" else zero)
    o, fin, inter = scalar_gdn(x["q"], x["k"], x["v"], x["A_log"], x["a"], x["dt_bias"], x["b"], lens, src,
                               x["scale"], x["l2"])
    o_class = [OUT_ORACLE] * sum(lens)
    pool = [p for p in pool_s]
    row_class = [ROW_UNTOUCHED] * len(pool_s)
    start = 0
    for n in range(N):
        toks = range(start, start + lens[n])
        start += lens[n]
        padded = reads[n] < 0
        if padded:
            for t in toks:
                if policy == "skip":
                    o[t] = [[0.0] * V for _ in range(HS)]
                elif policy == "null_slot":
                    o_class[t] = OUT_UNDEFINED
                else:
                    o[t] = out_init[t]
                    o_class[t] = OUT_CALLER
        if disable:
            continue
        w = writes[n]
        if padded or w < 0:
            if policy == "null_slot":
                row_class[0] = ROW_UNDEFINED
            continue
        if lens[n] == 0 and zero_length == "untouched":
            continue
        pool[w] = fin[n]
        row_class[w] = ROW_WRITTEN
    return o, o_class, pool, row_class, inter


@given(pooled_scalar_cases())
def test_scalar_pool_matches_pooled_oracle(c):
    x = scalar_inputs(c)
    rng = random.Random(c["seed"] + 1)
    HS, K, V, P = max(c["H"], c["HV"]), c["K"], c["V"], c["P"]
    pool_s = [[[[rng.uniform(-1, 1) for _ in range(V)] for _ in range(K)] for _ in range(HS)] for _ in range(P)]
    Ttot = sum(x["lens"])
    out_init = [[[rng.uniform(-9, 9) for _ in range(V)] for _ in range(HS)] for _ in range(Ttot)]
    want_o, want_cls, want_pool, want_rows, want_inter = scalar_pool(
        x, c["reads"], c["writes"], c["policy"], c["zero_length"], c["disable"], pool_s, out_init)

    q, k, v, a, b, A_log, dt_bias, _, cu = to_torch(x, batch=False)
    g, _, beta = compute_gates(A_log, a, dt_bias, b)
    lay = c["layout"]
    pool = torch.tensor(pool_s, dtype=F64)
    pool_in = pool if lay == "v_last" else pool.transpose(-1, -2).contiguous()
    out0 = torch.tensor(out_init, dtype=F64).view(1, Ttot, HS, V)
    wi = None if c["writes"] is None else torch.tensor(c["writes"])
    for form in ("recurrent", "chunked"):
        res = pooled_gated_delta_rule(
            q, k, v, g, beta, pool=pool_in, read_indices=torch.tensor(c["reads"]), write_indices=wi,
            policy=c["policy"], zero_length=c["zero_length"], disable_state_update=c["disable"], cu_seqlens=cu,
            layout=lay, scale=c["scale"], use_qk_l2norm=x["l2"], output_init=out0,
            output_intermediate=True, form=form, chunk_size=3)
        assert res.row_class.tolist() == want_rows
        assert res.o_class.view(-1).tolist() == want_cls
        got_pool = res.pool if lay == "v_last" else res.pool.transpose(-1, -2)
        for p, cls in enumerate(want_rows):
            if cls == ROW_UNTOUCHED:
                assert torch.equal(got_pool[p], pool[p]), f"untouched row {p} changed"
            elif cls == ROW_WRITTEN:
                assert_rel(got_pool[p], torch.tensor(want_pool[p], dtype=F64), f"pool row {p} ({form})")
        o = res.o.view(Ttot, HS, V)
        wo = torch.tensor(want_o, dtype=F64).view(Ttot, HS, V)
        cls = torch.tensor(want_cls, dtype=torch.int8)
        assert torch.equal(o[cls == OUT_CALLER], out0[0][cls == OUT_CALLER])  # bit-identical
        assert_rel(o[cls == OUT_ORACLE], wo[cls == OUT_ORACLE], f"o ({form})")
        # intermediates of live sequences
        inter = res.intermediate.view(Ttot, HS, *res.intermediate.shape[-2:])
        if lay == "k_last":
            inter = inter.transpose(-1, -2)
        start = 0
        for n, L in enumerate(x["lens"]):
            if c["reads"][n] >= 0 and L:
                want = torch.tensor([want_inter[t] for t in range(start, start + L)], dtype=F64)
                assert_rel(inter[start:start + L], want, f"intermediate seq {n} ({form})")
            start += L
