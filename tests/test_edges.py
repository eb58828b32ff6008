"""Values at the edges: the oracle's limits against mpmath / closed forms, and the edge inputs.

Error model: float64 softplus below the threshold is log1p(exp(x)) to ~2 ulp; above it the kernels'
linear branch returns x, whose relative distance to the true softplus is log1p(exp(-x)) / x < 1e-10.
"""
from __future__ import annotations

import math

import mpmath
import pytest
import torch

from gdncheck.data.case import Case
from gdncheck.inputs import materialize
from gdncheck_reference import beta_from_logit, gated_delta_rule, l2norm, sm90_log_alpha, softplus

F64 = torch.float64
XS = [-1000.0, -745.0, -700.0, -100.0, -30.0, -1.0, 0.0, 1.0, 19.99, 20.0, 20.01, 30.0, 88.8, 100.0, 1000.0]


@pytest.mark.parametrize("x", XS)
def test_softplus_limits_against_mpmath(x):
    mpmath.mp.dps = 50
    true = mpmath.log1p(mpmath.exp(x))
    got = softplus(torch.tensor([x], dtype=F64)).item()
    if x > 20:
        assert got == x  # the kernels' linear branch: softplus(x) -> x exactly
        assert abs(got - float(true)) / float(true) < 1.01 * math.exp(-x) / x + 1e-16
    elif float(true) == 0.0:
        assert got == 0.0
    else:
        assert abs(got - float(true)) <= 4e-16 * float(true) + 5e-324


def test_sm90_alpha_floor():
    g = torch.tensor([0.0, -1.0, -20.0, -23.0, -50.0, -1e4], dtype=F64)
    got = sm90_log_alpha(g)
    assert abs(got[1].item() + 1.0) < 1e-9 * math.e  # log(e^-1 + 1e-10) = -1 + 1e-10 e
    assert got[4].item() == pytest.approx(math.log(1e-10 + math.exp(-50)), rel=1e-15)
    assert got[5].item() == pytest.approx(math.log(1e-10), rel=1e-15)  # floored: ~e^-23.03
    assert (got >= math.log(1e-10)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_beta_from_logit_rounds_to_input_dtype(dtype):
    b = torch.tensor([-1000.0, -20.0, -0.3, 0.0, 0.7, 20.0, 1000.0]).to(dtype)
    beta = beta_from_logit(b)
    ref = torch.sigmoid(b.double())
    assert torch.equal(beta, ref.to(torch.float32).to(dtype).double())
    assert beta[0] == 0.0 and beta[-1] == 1.0
    if dtype != torch.float32:  # rounding to the input dtype is visible
        assert (beta - ref).abs().max() > 1e-6


def test_edge_gate_limits():
    c = Case(op="decode", seqlens=[1] * 4, H=2, HV=4, K=16, V=16, gate_source="raw", gate_dist="softplus_huge")
    x = materialize(c)
    sp = (x.a.double() + x.dt_bias.double())
    assert sp.min() >= 99 and sp.max() <= 1001
    assert torch.equal(softplus(sp), sp)  # linear branch
    assert (x.g < 0).all() and (x.g > -1).all()
    neg = materialize(c.model_copy(update={"gate_dist": "softplus_huge_neg"}))
    assert (neg.g == 0).all()  # softplus(-100..-1000) = 0 in fp32: alpha = 1
    bl = materialize(c.model_copy(update={"gate_dist": "beta_logit_huge"}))
    assert set(bl.beta.unique().tolist()) == {0.0, 1.0}
    du = materialize(c.model_copy(update={"gate_dist": "decay_underflow"}))
    assert (torch.exp(du.g) == 0).all() and (du.g <= -480).all()


def test_qk_zero_gives_zero_output_and_no_update():
    c = Case(op="prefill", seqlens=[7], H=1, HV=1, K=8, V=8, value_edge="qk_zero", dtype="float32")
    x = materialize(c)
    assert (x.q[0, ::3] == 0).all()
    assert l2norm(x.k[0, 0:1].double()).abs().max() == 0  # 0 / sqrt(0 + eps)
    res = gated_delta_rule(x.q, x.k, x.v, x.g.double(), x.beta.double(), cu_seqlens=x.cu_seqlens,
                           use_qk_l2norm=True, layout="k_last", form="recurrent")
    assert (res.o[0, ::3] == 0).all()


def test_qk_tiny_norm_below_one():
    c = Case(op="prefill", seqlens=[4], H=1, HV=1, K=128, V=8, value_edge="qk_tiny")
    x = materialize(c)
    n = l2norm(x.k[0, 0].double()).norm(dim=-1)
    assert (n < 0.9).all() and (n > 0.5).all()  # sum(x^2) ~ 1.3e-6 against eps 1e-6


@pytest.mark.parametrize("dtype,lo,hi", [("bfloat16", 1e-45, 1.18e-38), ("float16", 1e-9, 6.1e-5)])
def test_v_subnormal(dtype, lo, hi):
    x = materialize(Case(op="prefill", seqlens=[4], H=1, HV=1, K=8, V=64, dtype=dtype, value_edge="v_subnormal"))
    a = x.v.double().abs()
    assert a.max() < hi and (a[a > 0]).min() > lo


def test_poison_padding_only_on_padded_rows():
    c = Case(op="decode", seqlens=[1] * 4, H=2, HV=4, K=16, V=16, gate_source="raw", pool_size=6,
             read_indices=[1, -1, 3, -1], value_edge="poison_padding")
    x = materialize(c)
    assert torch.isnan(x.v[[1, 3]]).all() and torch.isinf(x.k[[1, 3]]).all()
    assert torch.isfinite(x.v[[0, 2]]).all() and torch.isfinite(x.a[[0, 2]]).all()
