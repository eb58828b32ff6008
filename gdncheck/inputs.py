"""Inputs of one call, built deterministically from a case.

:func:`materialize` builds every tensor from ``case.seed`` with a CPU generator (pools of more than
:data:`HASHED_POOL_ELEMENTS` elements from a counter-based hash on the target device), so a case id
gives bit-identical inputs on any machine; output buffers are NaN-poisoned.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import torch

from gdncheck.data.case import Case
from gdncheck_reference import compute_gates

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Inputs:
    """Tensors of one call, on one device. ``HS = max(H, HV)``; states in ``case.layout``.

    Attributes:
        q, k: ``[B, T, H, K]`` case.dtype.   v: ``[B, T, HV, V]`` case.dtype.
        A_log: ``[HS]`` fp32. dt_bias: ``[HS]`` fp32. a, b: ``[B, T, HS]`` case.gate_dtype
            (strided views when ``case.gate_strided``).
        g: ``[B, T, HS]`` fp32 log decay and beta ``[B, T, HS]`` fp32, precomputed from the raw
            gates in float64 then rounded once to fp32.
        cu_seqlens: ``[N + 1]`` int32 for prefill, else None.
        state: pool ``[P, HS, ...]`` (with indices) or initial state ``[N, HS, ...]``, case.state_dtype.
        read_indices, write_indices: ``[N]`` int32 or None.
        out: ``[B, T, HS, V]`` case.dtype, NaN-poisoned output buffer.
        intermediate: ``[B, T, HS, ...]`` fp32 NaN-poisoned buffer (verify with intermediate) or None.
    """

    case: Case
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    cu_seqlens: torch.Tensor | None
    state: torch.Tensor
    read_indices: torch.Tensor | None
    write_indices: torch.Tensor | None
    out: torch.Tensor
    intermediate: torch.Tensor | None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "case" and isinstance(getattr(self, f.name), torch.Tensor)}

    def clone(self, device: str | torch.device | None = None) -> "Inputs":
        """Deep copy, on ``device`` if given, that keeps each tensor's strides (strided views stay strided)."""
        def cp(t):
            if not isinstance(t, torch.Tensor):
                return t
            buf = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device or t.device)
            buf.copy_(t)
            return buf
        return Inputs(**{f.name: cp(getattr(self, f.name)) for f in fields(self)})


def _raw_gates(case: Case, gen: torch.Generator, B: int, T: int):
    HS = case.HS
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    d = case.gate_dist
    A_log = torch.log(1 + 15 * u(HS))
    dt_bias = torch.log(torch.expm1(0.001 + 0.099 * u(HS)))
    a, b = n(B, T, HS), n(B, T, HS)
    if d == "alpha_one":
        A_log = torch.full((HS,), -8.0, dtype=torch.float64) - u(HS)
    elif d == "alpha_tiny":  # g ~ -21: alpha ~ 1e-9
        A_log, dt_bias, a = torch.full((HS,), float(torch.log(torch.tensor(16.0)))), torch.zeros(HS), 1.0 + 0.1 * u(B, T, HS)
    elif d == "softplus_high":  # a + dt_bias on both sides of the threshold 20, far past it
        A_log, dt_bias, a = -4.0 - u(HS), torch.zeros(HS), 10.0 + 30.0 * u(B, T, HS)
    elif d == "softplus_low":
        dt_bias, a = torch.zeros(HS), -40.0 + 25.0 * u(B, T, HS)
    elif d == "beta_zero":
        b = -20.0 - u(B, T, HS)
    elif d == "beta_one":
        b = 20.0 + u(B, T, HS)
    elif d in ("softplus_huge", "softplus_huge_neg", "beta_logit_huge", "decay_underflow"):
        from gdncheck.edges import edge_gates
        A_log, dt_bias, a, b = edge_gates(d, A_log, dt_bias, a, b, u)
    return A_log, dt_bias, a, b


# Pools above this many elements (float64 copies past 1 GiB: cases only a GPU runs) are drawn by
# :func:`hashed_normal` on the target device: the CPU generator draws 10^8 normals per second on
# one core, 15 s for the 4100-slot pool that crosses 2^31 elements, in every backend's worker.
HASHED_POOL_ELEMENTS = 1 << 27

_MIX = (-7046029254386353131, -4658895280553007687, -7723592293110705685)  # splitmix64, as int64
_CHUNK = 1 << 24


def _lsr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (``>>`` on int64 tensors is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def hashed_normal(n: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """``n`` float32 values of mean 0 and variance 1, element ``i`` a function of ``(seed, i)`` only.

    splitmix64 of the element index, its four 16-bit fields summed (Irwin-Hall: near-normal,
    bounded at +-3.46), one int-to-float conversion and one float32 multiply: integer arithmetic
    and a correctly rounded product, so CPU and CUDA give the same bits at any chunking.
    """
    dev = torch.device(device)
    out = torch.empty(n, dtype=torch.float32, device=dev)
    inv_std = float(torch.tensor((3.0 / (65536.0 ** 2 - 1)) ** 0.5, dtype=torch.float32))
    base = (seed + 1) * 0x632BE59BD9B4E019 % (1 << 64)
    base -= (1 << 64) * (base >= 1 << 63)
    for lo in range(0, n, _CHUNK):
        z = torch.arange(lo + 1, min(n, lo + _CHUNK) + 1, dtype=torch.int64, device=dev) * _MIX[0] + base
        z = (z ^ _lsr(z, 30)) * _MIX[1]
        z = (z ^ _lsr(z, 27)) * _MIX[2]
        z = z ^ _lsr(z, 31)
        s = (z & 0xFFFF) + _lsr(z, 16) % 65536 + _lsr(z, 32) % 65536 + _lsr(z, 48)
        out[lo:lo + z.numel()] = (s - 131070).to(torch.float32) * inv_std
    return out


def materialize(case: Case, device: str | torch.device = "cpu") -> Inputs:
    """Build the inputs of ``case`` deterministically from ``case.seed`` (CPU generator).

    Tensors are drawn on the CPU in a fixed order and then moved; strided views are cut on the
    target device so their strides survive. Output buffers are NaN-poisoned.
    """
    gen = torch.Generator(device="cpu").manual_seed(case.seed)
    B, T, H, HV, HS, K, V, N = case.B, case.T, case.H, case.HV, case.HS, case.K, case.V, case.N
    dt, sdt, gdt = DTYPES[case.dtype], DTYPES[case.state_dtype], DTYPES[case.gate_dtype]
    q = (torch.randn(B, T, H, K, generator=gen) * case.qk_scale).to(dt)
    k = (torch.randn(B, T, H, K, generator=gen) * case.qk_scale).to(dt)
    v = (torch.randn(B, T, HV, V, generator=gen) * case.v_scale).to(dt)
    if case.value_edge is not None:
        from gdncheck.edges import edge_values
        q, k, v = edge_values(case, q, k, v)
    A_log, dt_bias, a, b = _raw_gates(case, gen, B, T)
    A_log, dt_bias = A_log.to(torch.float32), dt_bias.to(torch.float32)
    a, b = a.to(gdt), b.to(gdt)
    # Precomputed gates from the raw inputs as the kernel sees them, rounded once to fp32.
    g64, _, beta64 = compute_gates(A_log, a, dt_bias, b)
    g, beta = g64.to(torch.float32), beta64.to(torch.float32)
    sshape = (HS, K, V) if case.layout == "v_last" else (HS, V, K)
    rows = case.pool_size if case.pool_size is not None else N
    if rows * HS * K * V > HASHED_POOL_ELEMENTS:  # the last draw: nothing after it moves
        state = hashed_normal(rows * HS * K * V, case.seed, device).view(rows, *sshape)
        state = state.mul_(float(torch.tensor(case.state_scale, dtype=torch.float32))).to(sdt)
    else:
        state = (torch.randn(rows, *sshape, generator=gen) * case.state_scale).to(sdt)
    cu = None
    if case.op == "prefill":
        cu = torch.tensor([0] + torch.tensor(case.seqlens).cumsum(0).tolist(), dtype=torch.int32)
    ri = torch.tensor(case.read_indices, dtype=torch.int32) if case.read_indices is not None else None
    wi = torch.tensor(case.write_indices, dtype=torch.int32) if case.write_indices is not None else None

    dev = torch.device(device)
    q, k, v, A_log, dt_bias, g, beta = (t.to(dev) for t in (q, k, v, A_log, dt_bias, g, beta))
    if case.gate_strided:  # one projection output [B, T, 2*HS + 8]; a and b are column slices
        proj = torch.zeros(B, T, 2 * HS + 8, dtype=gdt, device=dev)
        proj[..., 4:4 + HS], proj[..., 8 + HS:8 + 2 * HS] = a.to(dev), b.to(dev)
        a, b = proj[..., 4:4 + HS], proj[..., 8 + HS:8 + 2 * HS]
    else:
        a, b = a.to(dev), b.to(dev)
    if case.pool_strided:  # slot stride = 2 slots, as in a layer-interleaved pool
        base = torch.zeros(rows, 2, *sshape, dtype=sdt, device=dev)
        base[:, 1] = state.to(dev)
        state = base[:, 1]
    else:
        state = state.to(dev)
    cu = cu.to(dev) if cu is not None else None
    ri = ri.to(dev) if ri is not None else None
    wi = wi.to(dev) if wi is not None else None
    out = torch.full((B, T, HS, V), float("nan"), dtype=dt, device=dev)
    inter = None
    if case.intermediate:
        inter = torch.full((B, T, *sshape), float("nan"), dtype=torch.float32, device=dev)
    res = Inputs(case=case, q=q, k=k, v=v, A_log=A_log, dt_bias=dt_bias, a=a, b=b, g=g, beta=beta,
                 cu_seqlens=cu, state=state, read_indices=ri, write_indices=wi, out=out, intermediate=inter)
    if case.value_edge == "poison_padding":
        from gdncheck.edges import poison_padding
        poison_padding(case, res)
    return res


def inputs_digest(inputs: Inputs) -> str:
    """sha256 (16 hex) over every input tensor's name, dtype, shape and bytes (CPU copies)."""
    h = hashlib.sha256()
    for name, t in sorted(inputs.tensors().items()):
        c = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{c.dtype}:{tuple(c.shape)}".encode())
        h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()[:16]
