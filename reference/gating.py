"""Gates and q/k normalisation in float64, with the rounding hooks used by ablations.

Math::

    g     = -exp(A_log) * softplus(a + dt_bias)      # log decay, <= 0
    alpha = exp(g)
    beta  = sigmoid(b)
"""
from __future__ import annotations

import torch

F64 = torch.float64


def softplus(x: torch.Tensor, threshold: float = 20.0) -> torch.Tensor:
    """softplus with beta = 1 and the kernels' linear branch above ``threshold``."""
    x = x.to(F64)
    return torch.where(x > threshold, x, torch.log1p(torch.exp(torch.clamp(x, max=threshold))))


def round_to(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Round ``x`` to ``dtype`` (nearest even) and return it as float64; ``None`` keeps it."""
    if dtype is None:
        return x.to(F64)
    return x.to(dtype).to(F64)


def compute_gates(
    A_log: torch.Tensor,
    a: torch.Tensor,
    dt_bias: torch.Tensor,
    b: torch.Tensor,
    *,
    beta_dtype: torch.dtype | None = None,
    exp_dtype: torch.dtype | None = None,
    softplus_threshold: float = 20.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gates from raw model inputs.

    Args:
        A_log: ``[HV]``; a, b: ``[..., HV]``; dt_bias: ``[HV]``. Any float dtype.
        beta_dtype: round ``beta`` to this dtype (ablation ``--beta-quant``); None keeps float64.
        exp_dtype: evaluate ``exp(g)`` with ``g`` and the result in this dtype
            (ablation ``--exp-precision``); None keeps float64.

    Returns:
        ``(g, alpha, beta)``, float64, shaped like ``a``. ``g`` is ``log(alpha)``
        recomputed from the (possibly rounded) ``alpha`` when ``exp_dtype`` is set,
        so that log-space and linear-space consumers see the same decay.
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b: shapes must match, got {tuple(a.shape)} and {tuple(b.shape)}")
    HV = a.shape[-1]
    for name, t in (("A_log", A_log), ("dt_bias", dt_bias)):
        if t.shape != (HV,):
            raise ValueError(f"{name}: shape must be [HV]=[{HV}], got {tuple(t.shape)}")
    g = -torch.exp(A_log.to(F64)) * softplus(a.to(F64) + dt_bias.to(F64), softplus_threshold)
    alpha = torch.exp(g)
    if exp_dtype is not None:
        alpha = torch.exp(g.to(exp_dtype)).to(F64)
        g = torch.log(alpha)
    beta = round_to(torch.sigmoid(b.to(F64)), beta_dtype)
    return g, alpha, beta


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x**2) + eps)`` over the last dim, the kernels' convention (not F.normalize)."""
    x = x.to(F64)
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


# FlashInfer's SM90 chunk kernel takes log2(alpha + 1e-10) of the linear alpha it is given
# (``AlphaProcessor``), so a decay below ~e^-23 per token acts as 1e-10.
SM90_ALPHA_EPS = 1e-10


def sm90_log_alpha(g: torch.Tensor, eps: float = SM90_ALPHA_EPS) -> torch.Tensor:
    """The log decay the SM90 prefill kernel applies for log decay ``g``: ``log(exp(g) + eps)``.

    Equal to ``g`` within ``eps * exp(-g)`` relative while ``g >> log(eps) ~ -23``; floored
    at ``log(eps)`` below. ``gate_domain="log"`` reaches it through ``alpha = exp(g)`` in fp32
    (0 below g ~ -103), so both domains hit the same floor.
    """
    return torch.log(torch.exp(g.to(F64)) + eps)


def beta_from_logit(b: torch.Tensor) -> torch.Tensor:
    """``beta_is_logit=True``: sigmoid in fp32, rounded to ``b``'s dtype, returned as float64.

    FlashInfer computes ``sigmoid(b.float()).to(b.dtype).float()``; the oracle rounds the float64
    sigmoid to fp32 first (a correctly rounded fp32 sigmoid) and then to ``b``'s dtype.
    """
    s = torch.sigmoid(b.to(F64)).to(torch.float32)
    return s.to(b.dtype).to(F64)


def gates_in_kernel(A_log: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """``use_gate_in_kernel=True`` in prefill: log decay ``-exp(A_log) * softplus(a + dt_bias)``,
    float64, from the raw inputs as the kernel received them (any dtype)."""
    return -torch.exp(A_log.to(F64)) * softplus(a.to(F64) + dt_bias.to(F64))
