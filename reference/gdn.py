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

import numbers
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
    # where, not a multiply by the mask: 0 * inf = NaN would leak a non-finite token into the
    # padding of every shorter sequence, and from there into its final state.
    return torch.where(valid.view(*valid.shape, *([1] * (out.dim() - 2))), out, 0.0)


def _scatter(y: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Inverse of :func:`_gather`: ``[N, Tmax, ...]`` -> ``[B, T, ...]``."""
    out = torch.zeros(B * T, *y.shape[2:], dtype=y.dtype, device=y.device)
    out[idx[valid]] = y[valid]
    return out.view(B, T, *y.shape[2:])


def _expand_heads(x: torch.Tensor, HS: int, dim: int) -> torch.Tensor:
    """Repeat each head ``HS // heads`` times along ``dim`` (GVA/GQA); no copy when equal."""
    r = HS // x.shape[dim]
    return x if r == 1 else x.repeat_interleave(r, dim=dim)


def _recurrent(q, k, v, g, beta, S, want_inter):
    """Token loop. q,k ``[N,T,H,K]``, v ``[N,T,HV,V]``, g,beta ``[N,T,HS]``, S ``[N,HS,K,V]``."""
    N, T, HS = g.shape
    q, k, v = _expand_heads(q, HS, 2), _expand_heads(k, HS, 2), _expand_heads(v, HS, 2)
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


def _chunked(q, k, v, g, beta, S, want_inter, C, scale=1.0, use_qk_l2norm=False):
    """WY/UT chunked form; same arguments as :func:`_recurrent` plus chunk size ``C``, and the
    q/k normalisation and q scale, applied chunk by chunk (no ``[T, H, K]`` temporaries).

    Per chunk of ``L <= C`` tokens, with ``gamma_t = exp(g_1 + ... + g_t)`` the decay from
    the chunk start and ``Dincl[t, j] = exp(g_{j+1} + ... + g_t)`` for ``j <= t`` (else 0)::

        A = I + strict_lower(beta_t * Dincl * (k k^T))
        U = A^{-1} (beta * (v - gamma * (k S)))          # the chunk's delta-rule corrections
        o = gamma * (q S) + (Dincl * (q k^T)) U
        S = gamma_L * S + (Dincl[L, :] * k)^T U

    ``q k^T`` and ``k k^T`` are computed at the ``H`` q/k heads. The loop works in buffers
    allocated once per chunk length: fresh multi-megabyte temporaries cost page faults
    that dominate the GEMMs. ``S`` (a private copy) is updated in place.
    """
    N, T, HS = g.shape
    H, K = q.shape[2], q.shape[3]
    HV, V = v.shape[2], v.shape[3]
    r, rv = HS // H, HS // HV  # state heads per q/k head (GVA), per value head (GQA)
    dev = q.device
    o = torch.empty(N, T, HS, V, dtype=F64, device=dev)
    inter = torch.empty(N, T, HS, K, V, dtype=F64, device=dev) if want_inter else None
    S3 = S.view(N * HS, K, V)
    bufs: dict[int, tuple] = {}
    for s in range(0, T, C):
        e = min(s + C, T)
        L = e - s
        if L not in bufs:
            tri = torch.ones(L, L, dtype=torch.bool, device=dev)
            bufs[L] = (
                ~tri.tril(), ~tri.tril(-1),
                torch.empty(N, H, r, 2 * L, K, dtype=F64, device=dev),  # [q; k] at the HS heads
                torch.empty(N, HS, L, L, dtype=F64, device=dev),  # gates strictly below the diagonal
                torch.empty(N, HS, L, L, dtype=F64, device=dev),  # Dincl
                torch.empty(N, HS, L, L, dtype=F64, device=dev),  # Dincl * q k^T
                torch.empty(N, HS, L, L, dtype=F64, device=dev),  # A
                torch.empty(N * HS, 2 * L, V, dtype=F64, device=dev),  # [q; k] S
                torch.empty(N, HS, L, V, dtype=F64, device=dev),  # right-hand side, then o
                torch.empty(N * HS, V, L, dtype=F64, device=dev).transpose(-1, -2),  # U (column-major)
                torch.empty(N, HS, L, K, dtype=F64, device=dev),  # k decayed to the chunk end
            )
        not_incl, not_strict, QK, Dsum, Dincl, QKm, A, QKS, R, U, kend = bufs[L]
        # [q; k] for this chunk, each q/k head repeated for its r state heads.
        qc, kc = q[:, s:e], k[:, s:e]
        if use_qk_l2norm:
            qc, kc = l2norm(qc), l2norm(kc)
        QK[:, :, :, :L] = (qc * scale).transpose(1, 2)[:, :, None]
        QK[:, :, :, L:] = kc.transpose(1, 2)[:, :, None]
        bc = beta[:, s:e].transpose(1, 2)  # [N, HS, L]
        gc = g[:, s:e].transpose(1, 2)  # [N, HS, L]
        gamma = torch.exp(gc.cumsum(-1))
        # D[t, j] = g_{j+1} + ... + g_t summed directly, not G_t - G_j: a huge gate
        # (-1e4 for alpha = 0) in G would cost the later, small gates their precision.
        Dsum.copy_(gc[..., :, None].expand(N, HS, L, L)).masked_fill_(not_strict, 0.0)
        torch.cumsum(Dsum, -2, out=Dincl)
        Dincl.masked_fill_(not_incl, float("-inf")).exp_()
        # q k^T and k k^T once per q/k head (batch stride skips the repeats).
        qk_h = QK.view(N * H, r, 2 * L, K)[:, 0]
        QKK = torch.bmm(qk_h, qk_h[:, L:].transpose(-1, -2)).view(N, H, 1, 2 * L, L)
        torch.mul(QKK[..., :L, :], Dincl.view(N, H, r, L, L), out=QKm.view(N, H, r, L, L))
        torch.mul(QKK[..., L:, :], Dincl.view(N, H, r, L, L), out=A.view(N, H, r, L, L))
        A.mul_(bc[..., :, None]).masked_fill_(not_strict, 0.0)
        A.diagonal(dim1=-2, dim2=-1).fill_(1.0)
        torch.bmm(QK.view(N * HS, 2 * L, K), S3, out=QKS)
        QKS4 = QKS.view(N, HS, 2 * L, V)
        R5 = R.view(N, HV, rv, L, V)
        torch.mul(QKS4[:, :, L:], gamma[..., None], out=R)
        torch.sub(v[:, s:e].transpose(1, 2)[:, :, None], R5, out=R5)
        R.mul_(bc[..., None])
        torch.linalg.solve_triangular(A.view(N * HS, L, L), R.view(N * HS, L, V), upper=False,
                                      unitriangular=True, out=U)
        # o = gamma * (q S) + QKm U, in R's buffer.
        torch.mul(QKS4[:, :, :L], gamma[..., None], out=R)
        R3 = R.view(N * HS, L, V)
        R3.baddbmm_(QKm.view(N * HS, L, L), U)
        o[:, s:e] = R.transpose(1, 2)
        kx = QK.view(N, HS, 2 * L, K)[:, :, L:]
        if want_inter:
            inter[:, s:e] = (gamma[..., None, None] * S[:, :, None] + torch.einsum(
                "nhtj,nhjk,nhjv->nhtkv", Dincl, kx, U.view(N, HS, L, V))).transpose(1, 2)
        torch.mul(kx, Dincl[..., -1, :, None], out=kend)  # decay from token j to the chunk end
        S.mul_(gamma[..., -1, None, None])
        S3.baddbmm_(kend.view(N * HS, L, K).transpose(-1, -2), U)
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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    if scale is None or scale == 0.0:
        scale = K ** -0.5
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale: must be positive and finite, got {scale}")
    dev = q.device
    qf, kf = q.to(F64), k.to(F64)
    if form == "recurrent":
        if use_qk_l2norm:
            qf, kf = l2norm(qf), l2norm(kf)
        qf = qf * scale
    vf = v.to(F64)
    gf = torch.clamp(g.to(F64), min=_G_MIN)
    bf = beta.to(F64)
    # q/k stay at their H heads and v at HV; each form maps them to the HS state heads
    # (GVA: state head i reads q/k head i // (HS // H); GQA: value head i // (HS // HV)).
    if cu_seqlens is None:
        idx = valid = None
        qs, ks, vs, gs, bs = qf, kf, vf, gf, bf
    else:
        idx, valid = _token_index(B, T, cu_seqlens, dev)
        qs, ks, vs, gs, bs = (_gather(x, idx, valid) for x in (qf, kf, vf, gf, bf))
    if initial_state is None:
        S0 = torch.zeros(N, HS, K, V, dtype=F64, device=dev)
    else:
        # A contiguous copy: the forms never alias the caller's tensor (final_state is S0 when T == 0).
        S0 = to_v_last(initial_state.to(device=dev, dtype=F64), layout).clone(memory_format=torch.contiguous_format)
    if form == "recurrent":
        o, S, inter = _recurrent(qs, ks, vs, gs, bs, S0, output_intermediate)
    else:
        o, S, inter = _chunked(qs, ks, vs, gs, bs, S0, output_intermediate, chunk_size, scale, use_qk_l2norm)
    if cu_seqlens is None:
        o_full, inter_full = o, inter
    else:
        o_full = _scatter(o, idx, valid, B, T)
        inter_full = _scatter(inter, idx, valid, B, T) if output_intermediate else None
    if output_intermediate:
        inter_full = from_v_last(inter_full, layout)
    return GDNResult(o=o_full, final_state=from_v_last(S, layout), intermediate=inter_full)
