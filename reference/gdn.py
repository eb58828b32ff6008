"""The gated delta rule in float64: recurrent and chunked (WY/UT) forms of one function.

Shapes (the field's letters)::

    q, k          [B, T, H, K]
    v             [B, T, HV, V]
    g, beta       [B, T, HS]        HS = max(H, HV); g is the log decay (<= 0)
    cu_seqlens    [N + 1]           packed varlen, requires B == 1; N = B otherwise
    initial_state [N, HS, K, V] (v_last) or [N, HS, V, K] (k_last)
    o             [B, T, HS, V]
    final_state   like initial_state
    intermediate  [B, T, HS, K, V] / [B, T, HS, V, K]: the state after each token

GVA (HV = r * H): value head ``i`` reads q/k head ``i // r``. GQA (H = r * HV):
state head ``i`` reads value head ``i // r``. Per token and state head (v_last)::

    S = alpha * S ; u = beta * (v - S^T k) ; S = S + k u^T ; o = S^T (scale * q)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gating import F64, l2norm
from .layouts import check_layout, from_v_last, to_v_last

FORMS = ("chunked", "recurrent")
# exp(-1e4) is 0 in float64; the clamp keeps cumulative sums of -inf gates finite.
_G_MIN = -1.0e4


@dataclass
class GDNResult:
    """Oracle outputs, float64. See the module docstring for shapes."""

    o: torch.Tensor
    final_state: torch.Tensor
    intermediate: torch.Tensor | None = None


def _is_int(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def head_dims(H: int, HV: int) -> int:
    """Number of state heads ``HS = max(H, HV)``; raises unless one divides the other."""
    if H <= 0 or HV <= 0:
        raise ValueError(f"H, HV: head counts must be positive, got H={H}, HV={HV}")
    HS = max(H, HV)
    if HS % H or HS % HV:
        raise ValueError(f"H, HV: one head count must be a multiple of the other, got H={H}, HV={HV}")
    return HS


def check_cu_seqlens(cu_seqlens: torch.Tensor, T: int) -> None:
    """``cu_seqlens [N+1]``: integer, starts at 0, non-decreasing, ends at ``T``."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: must be 1-D with N+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if not _is_int(cu_seqlens):
        raise ValueError(f"cu_seqlens: must be an integer tensor, got {cu_seqlens.dtype}")
    c = cu_seqlens.tolist()
    if c[0] != 0:
        raise ValueError(f"cu_seqlens: must start at 0, got {c[0]}")
    if any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens: must be non-decreasing (monotone), got {c}")
    if c[-1] != T:
        raise ValueError(f"cu_seqlens: last entry must equal the token count T={T}, got {c[-1]}")


def check_inputs(q, k, v, g, beta, cu_seqlens=None, initial_state=None, layout="v_last"):
    """Validate shapes; return ``(B, T, H, HV, HS, K, V, N)``. Raises ValueError naming the argument."""
    check_layout(layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: must be 4-D [B, T, heads, dim], got shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q, k: shapes must match, got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.shape[:2] != (B, T):
        raise ValueError(f"v: leading dims must be [B, T]=[{B}, {T}], got {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    HS = head_dims(H, HV)
    for name, t in (("g", g), ("beta", beta)):
        if tuple(t.shape) != (B, T, HS):
            raise ValueError(f"{name}: shape must be [B, T, max(H, HV)]=[{B}, {T}, {HS}], got {tuple(t.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens: packed varlen requires B == 1, got B={B}")
        check_cu_seqlens(cu_seqlens, T)
        N = cu_seqlens.numel() - 1
    else:
        N = B
    if initial_state is not None:
        want = (N, HS, K, V) if layout == "v_last" else (N, HS, V, K)
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state: shape must be {list(want)} ({layout}), got {tuple(initial_state.shape)}")
    return B, T, H, HV, HS, K, V, N


def _token_index(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token index ``[N, Tmax]`` into ``B*T`` and its validity mask."""
    if cu_seqlens is None:
        idx = torch.arange(B * T, device=device).view(B, T)
        return idx, torch.ones(B, T, dtype=torch.bool, device=device)
    c = cu_seqlens.to(device=device, dtype=torch.long)
    lens = c[1:] - c[:-1]
    Tmax = int(lens.max()) if lens.numel() else 0
    t = torch.arange(Tmax, device=device)
    valid = t[None, :] < lens[:, None]
    idx = torch.where(valid, c[:-1, None] + t[None, :], torch.zeros((), dtype=torch.long, device=device))
    return idx, valid


def _gather(x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x [B, T, ...]`` -> ``[N, Tmax, ...]`` float64 with zeros at padded positions."""
    flat = x.reshape(-1, *x.shape[2:]).to(F64)
    out = flat[idx]
    return out * valid.view(*valid.shape, *([1] * (out.dim() - 2)))


def _scatter(y: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Inverse of :func:`_gather`: ``[N, Tmax, ...]`` -> ``[B, T, ...]``."""
    out = torch.zeros(B * T, *y.shape[2:], dtype=y.dtype, device=y.device)
    out[idx[valid]] = y[valid]
    return out.view(B, T, *y.shape[2:])


def _recurrent(q, k, v, g, beta, S, want_inter):
    """Token loop. q,k ``[N,T,HS,K]``, v ``[N,T,HS,V]``, g,beta ``[N,T,HS]``, S ``[N,HS,K,V]``."""
    N, T, HS, _ = q.shape
    o = torch.empty(N, T, HS, v.shape[-1], dtype=F64, device=q.device)
    inter = [] if want_inter else None
    alpha = torch.exp(g)
    for t in range(T):
        S = S * alpha[:, t, :, None, None]
        kt = k[:, t]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("nhk,nhkv->nhv", kt, S))
        S = S + kt[..., :, None] * u[..., None, :]
        o[:, t] = torch.einsum("nhk,nhkv->nhv", q[:, t], S)
        if want_inter:
            inter.append(S)
    inter_t = torch.stack(inter, 1) if want_inter and T else (
        torch.empty(N, 0, HS, *S.shape[-2:], dtype=F64, device=q.device) if want_inter else None)
    return o, S, inter_t


def _chunked(q, k, v, g, beta, S, want_inter, C):
    """WY/UT chunked form; same arguments as :func:`_recurrent` plus chunk size ``C``."""
    N, T, HS, K = q.shape
    V = v.shape[-1]
    nc = -(-T // C)
    pad = nc * C - T
    if pad:
        # Padded tokens have g = 0, beta = 0, k = 0: they leave the state exactly as it is.
        q, k, v, g, beta = (torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) for x in (q, k, v, g, beta))

    def chunks(x):  # [N, nc*C, HS, ...] -> [nc, N, HS, C, ...], contiguous per chunk
        x = x.reshape(N, nc, C, HS, *x.shape[3:])
        return x.permute(1, 0, 3, 2, *range(4, x.dim())).contiguous()

    q, k, v, g, beta = map(chunks, (q, k, v, g, beta))
    G = g.cumsum(-1)  # [nc, N, HS, C]
    D = G[..., :, None] - G[..., None, :]  # D[t, j] = G_t - G_j
    tri = torch.ones(C, C, dtype=torch.bool, device=q.device)
    incl, strict = tri.tril(), tri.tril(-1)
    Dincl = torch.exp(D.masked_fill_(~incl, float("-inf")))
    gamma = torch.exp(G)  # decay from chunk start through token t
    IL = (k @ k.transpose(-1, -2)).mul_(Dincl).mul_(beta[..., :, None]).masked_fill_(~strict, 0.0)
    IL.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    U0 = torch.linalg.solve_triangular(IL, beta[..., None] * v, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(IL, (beta * gamma)[..., None] * k, upper=False, unitriangular=True)
    del IL
    QK = (q @ k.transpose(-1, -2)).mul_(Dincl)
    # k scaled by the decay from token j to the chunk end, transposed for the state update
    kT_end = (k * torch.exp(G[..., -1:] - G)[..., None]).transpose(-1, -2).contiguous()
    gq = gamma[..., None] * q
    o = torch.empty(nc, N, HS, C, V, dtype=F64, device=q.device)
    inter = torch.empty(nc, N, HS, C, K, V, dtype=F64, device=q.device) if want_inter else None
    for c in range(nc):
        U = torch.baddbmm(U0[c].view(-1, C, V), W[c].view(-1, C, K), S.view(-1, K, V), alpha=-1.0).view(N, HS, C, V)
        o[c] = gq[c] @ S + QK[c] @ U
        if want_inter:
            inter[c] = gamma[c, :, :, :, None, None] * S[:, :, None] + torch.einsum(
                "nhtj,nhjk,nhjv->nhtkv", Dincl[c], k[c], U)
        S = gamma[c, :, :, -1, None, None] * S + kT_end[c] @ U
    o = o.permute(1, 0, 3, 2, 4).reshape(N, nc * C, HS, V)[:, :T]
    if want_inter:
        inter = inter.permute(1, 0, 3, 2, 4, 5).reshape(N, nc * C, HS, K, V)[:, :T]
    return o, S, inter


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    layout: str = "v_last",
    output_intermediate: bool = False,
    form: str = "chunked",
    chunk_size: int = 64,
) -> GDNResult:
    """The gated delta rule in float64 on the inputs' device. Shapes: module docstring.

    Args:
        g: log decay (``alpha = exp(g)``), float64 recommended.
        scale: q scale; None means ``K ** -0.5``.
        use_qk_l2norm: normalise q and k with ``x / sqrt(sum(x^2) + 1e-6)`` first.
        layout: layout of ``initial_state`` and of the returned states.
        form: ``"chunked"`` (WY/UT, fast) or ``"recurrent"`` (token loop); same function.
    """
    B, T, H, HV, HS, K, V, N = check_inputs(q, k, v, g, beta, cu_seqlens, initial_state, layout)
    if form not in FORMS:
        raise ValueError(f"form: must be one of {FORMS}, got {form!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
    if scale is None or scale == 0.0:
        scale = K ** -0.5
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale: must be positive and finite, got {scale}")
    dev = q.device
    qf, kf = q.to(F64), k.to(F64)
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    qf = qf * scale
    # Expand q/k and v to the HS state heads (GVA repeats q/k, GQA repeats v).
    qf = qf.repeat_interleave(HS // H, dim=2)
    kf = kf.repeat_interleave(HS // H, dim=2)
    vf = v.to(F64).repeat_interleave(HS // HV, dim=2)
    idx, valid = _token_index(B, T, cu_seqlens, dev)
    qs, ks, vs = (_gather(x, idx, valid) for x in (qf, kf, vf))
    gs = _gather(torch.clamp(g.to(F64), min=_G_MIN), idx, valid)
    bs = _gather(beta.to(F64), idx, valid)
    if initial_state is None:
        S0 = torch.zeros(N, HS, K, V, dtype=F64, device=dev)
    else:
        S0 = to_v_last(initial_state.to(device=dev, dtype=F64), layout)
    if form == "recurrent":
        o, S, inter = _recurrent(qs, ks, vs, gs, bs, S0, output_intermediate)
    else:
        o, S, inter = _chunked(qs, ks, vs, gs, bs, S0, output_intermediate, chunk_size)
    o_full = _scatter(o, idx, valid, B, T)
    inter_full = None
    if output_intermediate:
        inter_full = from_v_last(_scatter(inter, idx, valid, B, T), layout)
    return GDNResult(o=o_full, final_state=from_v_last(S, layout), intermediate=inter_full)
