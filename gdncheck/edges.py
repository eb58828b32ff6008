"""Inputs at the numeric edges, and what the oracle expects of them.

Gate distributions (``Case.gate_dist``), raw inputs in float64 before rounding to the gate dtype:

``softplus_huge``      a + dt_bias in [100, 1000]: past exp overflow in fp32/bf16 (88.7) and fp16 (11.1);
                       softplus(x) -> x, small A_log keeps g = -exp(A_log) * x in [-0.35, -0.03].
``softplus_huge_neg``  a + dt_bias in [-1000, -100]: softplus(x) -> exp(x) = 0 in fp32, g -> 0, alpha = 1.
``beta_logit_huge``    b = +-[100, 1000], random sign: beta is exactly 0 or 1 in fp32.
``decay_underflow``    g in [-16000, -480]: exp(g) is 0 in fp32 (and below the SM90 prefill floor
                       1e-10): the state restarts at every token.

Value edges (``Case.value_edge``), applied to q, k, v after rounding to the case dtype:

``qk_zero``         q and k exactly zero on every third token: the L2 norm is x / sqrt(0 + 1e-6) = 0,
                    so that token neither updates the state nor reads it (output 0).
``qk_tiny``         q and k times 1e-4 on every other token: sum(x^2) ~ 1e-8 K is of the order of the
                    L2 eps 1e-6, so the normalised vector has norm < 1 (the eps matters).
``v_huge``          v times 1e4 (fp16: 1e3, its max is 65504): outputs ~1e4, far from overflow.
``v_subnormal``     v times 1e-39 (bf16; fp16: 1e-6): subnormal in the case dtype; a kernel that
                    flushes subnormals to zero returns 0 where the oracle has ~1e-39.
``poison_padding``  NaN in v, a, b and +Inf in q, k on the tokens of padded rows (read index < 0):
                    they must not reach live rows, live outputs or any pool row.

The oracle needs nothing special: float64 softplus with the kernels' threshold gives the limits
(tested against mpmath in ``tests/test_edges.py``).
"""
from __future__ import annotations

import torch

EDGE_GATE_DISTS = ("softplus_huge", "softplus_huge_neg", "beta_logit_huge", "decay_underflow")
VALUE_EDGES = ("qk_zero", "qk_tiny", "v_huge", "v_subnormal", "poison_padding")


def edge_gates(dist: str, A_log, dt_bias, a, b, u):
    """Raw gates of an edge distribution. ``u(*shape)``: uniform [0, 1) float64 draws of the case's generator."""
    HS = A_log.shape[0]
    shape = a.shape
    if dist == "softplus_huge":
        A_log, dt_bias, a = -8.0 - 2.0 * u(HS), torch.zeros(HS, dtype=torch.float64), 100.0 + 900.0 * u(*shape)
    elif dist == "softplus_huge_neg":
        dt_bias, a = torch.zeros(HS, dtype=torch.float64), -100.0 - 900.0 * u(*shape)
    elif dist == "beta_logit_huge":
        sign = torch.where(u(*shape) < 0.5, -1.0, 1.0).to(torch.float64)
        b = sign * (100.0 + 900.0 * u(*shape))
    elif dist == "decay_underflow":
        A_log, dt_bias = torch.full((HS,), 2.772588722239781, dtype=torch.float64), torch.zeros(HS, dtype=torch.float64)
        a = 30.0 + 970.0 * u(*shape)
    else:
        raise ValueError(f"gate_dist: unknown edge {dist!r}; known: {EDGE_GATE_DISTS}")
    return A_log, dt_bias, a, b


def edge_values(case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k ``[B, T, H, K]`` and v ``[B, T, HV, V]`` in the case dtype, at ``case.value_edge``."""
    e = case.value_edge
    fp16 = v.dtype == torch.float16
    if e == "qk_zero":
        q, k = q.clone(), k.clone()
        q[:, ::3] = 0
        k[:, ::3] = 0
    elif e == "qk_tiny":
        q, k = q.clone(), k.clone()
        q[:, ::2] = (q[:, ::2].double() * 1e-4).to(q.dtype)
        k[:, ::2] = (k[:, ::2].double() * 1e-4).to(k.dtype)
    elif e == "v_huge":
        v = (v.double() * (1e3 if fp16 else 1e4)).to(v.dtype)
    elif e == "v_subnormal":
        v = (v.double() * (1e-6 if fp16 else 1e-39)).to(v.dtype)
    return q, k, v


def poison_padding(case, inputs) -> None:
    """``poison_padding``: NaN/Inf on the tokens of padded rows (decode/verify rows with read index < 0), in place."""
    if case.value_edge != "poison_padding" or case.op == "prefill":
        return
    for n in case.padded_rows:
        inputs.q[n] = float("inf")
        inputs.k[n] = float("inf")
        inputs.v[n] = float("nan")
        inputs.a[n] = float("nan")
        inputs.b[n] = float("nan")
        inputs.g[n] = float("nan")
        inputs.beta[n] = float("nan")
