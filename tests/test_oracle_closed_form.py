"""Closed-form checks of the oracle, layout round-trips, and the gating hooks.

* ``beta = 0``: the state only decays, ``S_t = prod(alpha_1..t) * S0`` and ``o_t = S_t^T q_t``.
* ``alpha -> 0``: the initial state is forgotten; with every gate at zero each token resets
  the state to ``beta_t k_t v_t^T``.
* Orthonormal keys, ``beta = 1``, ``g = 0``, ``S0 = 0``: the state stores ``v_i`` under ``k_i``.
* Layouts: ``k_last`` results are the transposes of ``v_last`` results.
* Gates: bf16 rounding of beta, exp in a low-precision dtype, the softplus threshold at 20.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gdncheck_reference import (
    LAYOUTS,
    compute_gates,
    convert,
    from_v_last,
    gated_delta_rule,
    l2norm,
    round_to,
    softplus,
    to_v_last,
)

F64 = torch.float64


FORMS = [("recurrent", 64), ("chunked", 4), ("chunked", 64)]
HEADS = [(1, 1), (2, 4), (2, 6), (4, 2), (3, 1)]


def assert_rel(x, ref, what, rtol=1e-12):
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = (x - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:g} * {scale:.3e}"


def expand_heads(x: torch.Tensor, HS: int) -> torch.Tensor:
    """``[..., heads, D]`` -> ``[..., HS, D]``: head ``i`` of the result reads head ``i // r``."""
    return x.repeat_interleave(HS // x.shape[-2], dim=-2)


@st.composite
def shapes(draw):
    H, HV = draw(st.sampled_from(HEADS))
    return dict(H=H, HV=HV, B=draw(st.integers(1, 2)), T=draw(st.integers(1, 21)),
                K=draw(st.sampled_from([2, 4, 8])), V=draw(st.sampled_from([2, 4, 8])),
                layout=draw(st.sampled_from(LAYOUTS)), seed=draw(st.integers(0, 2**31 - 1)))


def rand_inputs(s):
    gen = torch.Generator().manual_seed(s["seed"])
    H, HV, B, T, K, V = s["H"], s["HV"], s["B"], s["T"], s["K"], s["V"]
    HS = max(H, HV)
    r = lambda *sh: torch.randn(*sh, generator=gen, dtype=F64)  # noqa: E731
    return HS, r(B, T, H, K), r(B, T, H, K), r(B, T, HV, V), r(B, HS, K, V), gen


# --------------------------------------------------------------------------------------
# beta = 0: decay only
# --------------------------------------------------------------------------------------

@given(shapes(), st.sampled_from(["mild", "strong", "zero"]))
def test_beta_zero_only_decays(s, gates):
    HS, q, k, v, S0, gen = rand_inputs(s)
    B, T, K = s["B"], s["T"], s["K"]
    g = {"mild": -0.2, "strong": -3.0, "zero": 0.0}[gates] * torch.rand(B, T, HS, generator=gen, dtype=F64)
    beta = torch.zeros(B, T, HS, dtype=F64)
    lay = s["layout"]
    decay = torch.exp(torch.cumsum(g, 1))  # prod(alpha_1..t)  [B, T, HS]
    S_t = decay[..., None, None] * S0[:, None]  # [B, T, HS, K, V]
    qs = expand_heads(q, HS) * K ** -0.5
    o_want = torch.einsum("bthk,bthkv->bthv", qs, S_t)
    for form, C in FORMS:
        res = gated_delta_rule(q, k, v, g, beta, initial_state=from_v_last(S0, lay).contiguous(), layout=lay,
                               output_intermediate=True, form=form, chunk_size=C)
        assert_rel(to_v_last(res.final_state, lay), S_t[:, -1], f"final_state ({form})")
        assert_rel(to_v_last(res.intermediate, lay), S_t, f"intermediate ({form})")
        assert_rel(res.o, o_want, f"o ({form})")
    if gates == "zero":  # alpha = 1 exactly, nothing added: the state comes back bit-identical
        res = gated_delta_rule(q, k, v, g, beta, initial_state=S0, form="recurrent")
        assert torch.equal(res.final_state, S0)


# --------------------------------------------------------------------------------------
# alpha -> 0: forgetting
# --------------------------------------------------------------------------------------

@given(shapes(), st.sampled_from([-float("inf"), -1e4, -800.0]), st.booleans())
def test_vanishing_alpha_forgets_initial_state(s, g_min, l2):
    """A gate with exp(g) == 0 at token 0 makes everything after it independent of S0."""
    HS, q, k, v, S0, gen = rand_inputs(s)
    B, T = s["B"], s["T"]
    g = -0.5 * torch.rand(B, T, HS, generator=gen, dtype=F64)
    g[:, 0] = g_min
    beta = torch.rand(B, T, HS, generator=gen, dtype=F64)
    other = 100.0 * torch.randn(S0.shape, generator=gen, dtype=F64)
    for form, C in FORMS:
        kw = dict(use_qk_l2norm=l2, form=form, chunk_size=C, output_intermediate=True)
        a = gated_delta_rule(q, k, v, g, beta, initial_state=S0, **kw)
        b = gated_delta_rule(q, k, v, g, beta, initial_state=other, **kw)
        z = gated_delta_rule(q, k, v, g, beta, **kw)  # zero initial state
        for res in (b, z):
            assert torch.isfinite(res.o).all() and torch.isfinite(res.final_state).all()
            assert torch.equal(res.final_state, a.final_state), form
            assert torch.equal(res.o, a.o), form
            assert torch.equal(res.intermediate, a.intermediate), form


@given(shapes(), st.sampled_from([-float("inf"), -1e4, -1e3]))
def test_all_gates_vanishing_resets_every_token(s, g_min):
    """alpha_t = 0 for every t: S_t = beta_t k_t v_t^T, o_t = beta_t (q_t . k_t) v_t."""
    HS, q, k, v, S0, gen = rand_inputs(s)
    B, T, K = s["B"], s["T"], s["K"]
    g = torch.full((B, T, HS), g_min, dtype=F64)
    beta = torch.rand(B, T, HS, generator=gen, dtype=F64)
    qn, kn = expand_heads(l2norm(q), HS), expand_heads(l2norm(k), HS)
    vx = expand_heads(v, HS)
    S_want = beta[..., None, None] * kn[..., :, None] * vx[..., None, :]
    o_want = beta[..., None] * (qn * kn).sum(-1, keepdim=True) * K ** -0.5 * vx
    for form, C in FORMS:
        res = gated_delta_rule(q, k, v, g, beta, initial_state=S0, use_qk_l2norm=True, output_intermediate=True,
                               form=form, chunk_size=C)
        assert_rel(res.intermediate, S_want, f"intermediate ({form})")
        assert_rel(res.final_state, S_want[:, -1], f"final_state ({form})")
        assert_rel(res.o, o_want, f"o ({form})")


# --------------------------------------------------------------------------------------
# orthonormal keys, beta = 1, g = 0: exact storage
# --------------------------------------------------------------------------------------

@given(st.sampled_from(HEADS), st.integers(1, 12), st.integers(0, 4), st.sampled_from([1, 2, 5]),
       st.integers(0, 2**31 - 1), st.sampled_from(LAYOUTS))
def test_orthonormal_keys_store_values(heads, T, extra_k, V, seed, layout):
    """With keys k_1..k_T orthonormal, beta = 1, g = 0, S0 = 0 and no L2 norm,
    S_T^T k_i = v_i for every stored key, and a query q_t = k_i (i <= t) reads scale * v_i."""
    H, HV = heads
    HS, K = max(H, HV), T + extra_k
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(H, K, K, generator=gen, dtype=F64))  # columns orthonormal
    keys = basis.transpose(-1, -2)[:, :T]  # [H, T, K], orthonormal rows per head
    k = keys.transpose(0, 1)[None].contiguous()  # [1, T, H, K]
    # Query at token t: a key already stored, chosen at random.
    pick = [int(torch.randint(0, t + 1, (1,), generator=gen)) for t in range(T)]
    q = k[:, pick].clone()
    v = torch.randn(1, T, HV, V, generator=gen, dtype=F64)
    g = torch.zeros(1, T, HS, dtype=F64)
    beta = torch.ones(1, T, HS, dtype=F64)
    scale = 0.75
    kx, vx = expand_heads(k[0], HS), expand_heads(v[0], HS)  # [T, HS, .]
    for form, C in FORMS:
        res = gated_delta_rule(q, k, v, g, beta, scale=scale, layout=layout, form=form, chunk_size=C)
        S = to_v_last(res.final_state, layout)[0]  # [HS, K, V]
        read = torch.einsum("thk,hkv->thv", kx, S)
        assert_rel(read, vx, f"S^T k_i ({form})")
        assert_rel(res.o[0], scale * vx[pick], f"o ({form})")


# --------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------

@given(st.lists(st.integers(1, 4), min_size=2, max_size=5), st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS))
def test_layout_round_trips(shape, src, dst):
    x = torch.randn(*shape, dtype=F64)
    y = convert(x, src, dst)
    assert y.is_contiguous()
    assert torch.equal(convert(y, dst, src), x)
    assert torch.equal(y, x if src == dst else x.transpose(-1, -2))
    assert torch.equal(from_v_last(to_v_last(x, src), src), x)
    assert torch.equal(to_v_last(from_v_last(x, dst), dst), x)
    if src == "k_last":
        assert torch.equal(to_v_last(x, src), x.transpose(-1, -2))


@given(shapes(), st.booleans(), st.sampled_from(["recurrent", "chunked"]))
def test_k_last_is_transposed_v_last(s, varlen, form):
    """Same inputs in both layouts: states are exact transposes, outputs identical."""
    HS, q, k, v, S0, gen = rand_inputs(s)
    B, T = s["B"], s["T"]
    g = -torch.rand(B, T, HS, generator=gen, dtype=F64)
    beta = torch.rand(B, T, HS, generator=gen, dtype=F64)
    cu = None
    if varlen:
        q, k, v, g, beta = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta))
        cu = torch.arange(B + 1) * T
    kw = dict(cu_seqlens=cu, use_qk_l2norm=True, output_intermediate=True, form=form, chunk_size=8)
    a = gated_delta_rule(q, k, v, g, beta, initial_state=S0, layout="v_last", **kw)
    b = gated_delta_rule(q, k, v, g, beta, initial_state=convert(S0, "v_last", "k_last"), layout="k_last", **kw)
    assert torch.equal(b.o, a.o)
    assert torch.equal(b.final_state, a.final_state.transpose(-1, -2))
    assert torch.equal(b.intermediate, a.intermediate.transpose(-1, -2))
    assert b.final_state.shape[-2:] == (s["V"], s["K"])


def test_bad_layout_names_the_argument():
    x = torch.zeros(2, 2)
    for f in (lambda: to_v_last(x, "kv"), lambda: from_v_last(x, "V_last"), lambda: convert(x, "v_last", "x")):
        with pytest.raises(ValueError, match="layout"):
            f()


# --------------------------------------------------------------------------------------
# gating hooks
# --------------------------------------------------------------------------------------

def _raw_gates(seed, T=64, HV=4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(HV, generator=gen, dtype=F64), 8 * torch.randn(1, T, HV, generator=gen, dtype=F64),
            torch.randn(HV, generator=gen, dtype=F64), 6 * torch.randn(1, T, HV, generator=gen, dtype=F64))


@given(st.integers(0, 2**31 - 1))
def test_compute_gates_matches_formula(seed):
    A_log, a, dt_bias, b = _raw_gates(seed)
    g, alpha, beta = compute_gates(A_log, a, dt_bias, b)
    for i in range(a.shape[1]):
        for h in range(a.shape[2]):
            x = a[0, i, h].item() + dt_bias[h].item()
            sp = x if x > 20 else math.log1p(math.exp(x))
            want_g = -math.exp(A_log[h].item()) * sp
            assert g[0, i, h].item() == pytest.approx(want_g, rel=1e-14, abs=1e-300)
            assert alpha[0, i, h].item() == pytest.approx(math.exp(want_g), rel=1e-13, abs=1e-300)
            assert beta[0, i, h].item() == pytest.approx(1 / (1 + math.exp(-b[0, i, h].item())), rel=1e-15)
    assert g.dtype == alpha.dtype == beta.dtype == F64
    assert (g <= 0).all() and (alpha > 0).all() and (alpha <= 1).all()


@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_beta_dtype_rounds_beta(seed, dtype):
    A_log, a, dt_bias, b = _raw_gates(seed)
    g0, alpha0, beta0 = compute_gates(A_log, a, dt_bias, b)
    g, alpha, beta = compute_gates(A_log, a, dt_bias, b, beta_dtype=dtype)
    assert beta.dtype == F64
    assert torch.equal(beta, torch.sigmoid(b).to(dtype).to(F64))  # round to nearest even, once
    assert torch.equal(beta.to(dtype).to(F64), beta)  # representable in dtype
    assert torch.equal(g, g0) and torch.equal(alpha, alpha0)  # the decay is untouched
    fi = torch.finfo(dtype)
    # half an ulp at most (the absolute floor covers float16's subnormals)
    assert ((beta - beta0).abs() <= fi.eps / 2 * beta0.abs() + fi.smallest_normal * fi.eps / 2).all()
    if dtype == torch.bfloat16:
        assert not torch.equal(beta, beta0)
    assert torch.equal(round_to(beta0, None), beta0)


def test_beta_dtype_rounds_to_nearest_even():
    # 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: nearest even is 1.
    # 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: nearest even is 1 + 2^-6.
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20], dtype=F64)
    assert round_to(x, torch.bfloat16).tolist() == [1.0, 1 + 2**-6, 1 + 2**-7]


@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_exp_dtype_evaluates_exp_in_that_dtype(seed, dtype):
    A_log, a, dt_bias, b = _raw_gates(seed)
    g0, alpha0, beta0 = compute_gates(A_log, a, dt_bias, b)
    g, alpha, beta = compute_gates(A_log, a, dt_bias, b, exp_dtype=dtype)
    assert torch.equal(alpha, torch.exp(g0.to(dtype)).to(F64))
    assert torch.equal(alpha.to(dtype).to(F64), alpha)  # a value of that dtype
    assert torch.equal(g, torch.log(alpha))  # log-space consumers see the same decay
    assert torch.equal(beta, beta0)
    if dtype == torch.bfloat16:
        assert not torch.equal(alpha, alpha0)


def test_exp_dtype_underflow_gives_minus_inf_log_decay_that_the_oracle_accepts():
    A_log = torch.tensor([3.0], dtype=F64)
    a = torch.tensor([[[30.0]]], dtype=F64)  # g = -e^3 * 30 ~ -602: exp underflows in bf16
    g, alpha, _ = compute_gates(A_log, a, torch.zeros(1, dtype=F64), a, exp_dtype=torch.bfloat16)
    assert alpha.item() == 0.0 and g.item() == -math.inf
    q = torch.randn(1, 1, 1, 4, dtype=F64)
    for form in ("recurrent", "chunked"):
        res = gated_delta_rule(q, q, q, g, torch.ones(1, 1, 1, dtype=F64), initial_state=torch.ones(1, 1, 4, 4,
                               dtype=F64), form=form)
        assert torch.isfinite(res.final_state).all()


def test_softplus_threshold_branch():
    t = 20.0
    below = torch.tensor([-50.0, -1.0, 0.0, 5.0, 19.5, 20.0], dtype=F64)
    assert torch.equal(softplus(below), torch.log1p(torch.exp(below)))  # 20 itself is below the branch
    above = torch.tensor([math.nextafter(20.0, 21.0), 20.5, 25.0, 100.0, 1e6], dtype=F64)
    assert torch.equal(softplus(above), above)  # linear branch returns x exactly
    # log1p(exp(x)) - x = log1p(exp(-x)) ~ 2e-9 at 20: the branch is visible, not a rounding
    assert softplus(torch.tensor([20.0], dtype=F64)).item() - 20.0 == pytest.approx(math.log1p(math.exp(-20.0)),
                                                                                      rel=1e-6)
    # the threshold is a parameter
    x = torch.tensor([5.0, 15.0], dtype=F64)
    y = softplus(x, threshold=10.0)
    assert y[1].item() == 15.0 and y[0].item() == pytest.approx(math.log1p(math.exp(5.0)), rel=1e-15)
    assert torch.isfinite(softplus(torch.tensor([1e300], dtype=F64))).all()  # no overflow on either branch
    # compute_gates uses it on a + dt_bias
    A_log = torch.zeros(1, dtype=F64)
    a = torch.tensor([[[t - 0.25, t + 0.25]]], dtype=F64).view(1, 2, 1)
    dt_bias = torch.tensor([0.125], dtype=F64)
    g, _, _ = compute_gates(A_log, a, dt_bias, torch.zeros_like(a))
    assert g[0, 1, 0].item() == -(t + 0.375)
    assert g[0, 0, 0].item() == pytest.approx(-math.log1p(math.exp(t - 0.125)), rel=1e-15)
    assert g[0, 0, 0].item() != -(t - 0.125)
    g10, _, _ = compute_gates(A_log, a, dt_bias, torch.zeros_like(a), softplus_threshold=10.0)
    assert g10[0, 0, 0].item() == -(t - 0.125)
