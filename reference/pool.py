"""State pools: read/write slot indices, padding policies, and the expected pool after a call.

A pool is ``[P, HS, K, V]`` (v_last) or ``[P, HS, V, K]`` (k_last). Sequence ``n`` reads its
initial state from slot ``read_indices[n]`` and writes its final state to slot
``write_indices[n]`` (default: the read slot). A negative index marks a padded row; what a
kernel does with it is a named **padding policy** that a backend declares per path:

``skip``
    padded row: output zero, no read, no write (FlashInfer fp32 T=1 decode).
``null_slot``
    index -1 means slot 0, a sacrificial slot the caller reserves: the row reads and writes
    slot 0, its output and slot 0 afterwards are undefined (FlashInfer bf16 decode, SGLang).
``caller_value``
    padded row: no read, no write, output rows keep what the caller put there (FlashInfer MTP).

Zero-length sequences (a live index, no tokens) follow a **zero-length policy**:
``passthrough`` (the write slot receives the initial state) or ``untouched`` (no write).

Every pool row ends in exactly one class (:data:`ROW_UNTOUCHED` rows must be bit-identical
to the input pool, :data:`ROW_WRITTEN` rows equal the oracle, :data:`ROW_UNDEFINED` rows are
not checked), and every output token likewise (:data:`OUT_ORACLE`, :data:`OUT_UNDEFINED`,
:data:`OUT_CALLER`: bit-identical to the caller's buffer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gating import F64
from .gdn import check_inputs, gated_delta_rule
from .layouts import check_layout

PADDING_POLICIES = ("skip", "null_slot", "caller_value")
ZERO_LENGTH_POLICIES = ("passthrough", "untouched")

ROW_UNTOUCHED, ROW_WRITTEN, ROW_UNDEFINED = 0, 1, 2
OUT_ORACLE, OUT_UNDEFINED, OUT_CALLER = 0, 1, 2


@dataclass
class PoolResult:
    """Expected outcome of a pooled call.

    Attributes:
        o: ``[B, T, HS, V]`` float64 expected output (caller's values where ``o_class == OUT_CALLER``).
        o_class: ``[B, T]`` int8, one of ``OUT_*`` per token.
        pool: ``[P, HS, ...]`` float64 expected pool in the call's layout.
        row_class: ``[P]`` int8, one of ``ROW_*`` per slot.
        intermediate: ``[B, T, HS, ...]`` float64 state after each token, or None.
    """

    o: torch.Tensor
    o_class: torch.Tensor
    pool: torch.Tensor
    row_class: torch.Tensor
    intermediate: torch.Tensor | None = None


def check_indices(name: str, idx: torch.Tensor, n: int, pool_size: int) -> list[int]:
    """Indices ``[n]``, integer, each negative (padding) or in ``[0, pool_size)``."""
    if idx.dim() != 1 or idx.numel() != n:
        raise ValueError(f"{name}: must be 1-D with one entry per sequence (N={n}), got shape {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"{name}: must be an integer tensor, got {idx.dtype}")
    vals = idx.tolist()
    bad = [i for i in vals if i >= pool_size]
    if bad:
        raise ValueError(f"{name}: index {bad[0]} is out of the pool (pool size {pool_size})")
    return vals


def pooled_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    pool: torch.Tensor,
    read_indices: torch.Tensor,
    write_indices: torch.Tensor | None = None,
    policy: str = "skip",
    zero_length: str = "passthrough",
    disable_state_update: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    layout: str = "v_last",
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    output_init: torch.Tensor | None = None,
    output_intermediate: bool = False,
    form: str = "chunked",
    chunk_size: int = 64,
) -> PoolResult:
    """The oracle for a call that reads and writes a state pool.

    Args:
        q, k, v, g, beta, cu_seqlens, scale, use_qk_l2norm: as :func:`gated_delta_rule`.
        pool: ``[P, HS, K, V]`` (v_last) / ``[P, HS, V, K]`` (k_last), any float dtype.
        read_indices: ``[N]`` int; negative = padded row.
        write_indices: ``[N]`` int or None (write where read); negative = no live write.
        policy: padding policy (module docstring); zero_length: zero-length policy.
        disable_state_update: no pool row is written (outputs are still computed).
        output_init: ``[B, T, HS, V]`` the caller's output buffer before the call
            (needed for ``caller_value``; NaN-poisoned when None).
    """
    check_layout(layout)
    if policy not in PADDING_POLICIES:
        raise ValueError(f"policy: must be one of {PADDING_POLICIES}, got {policy!r}")
    if zero_length not in ZERO_LENGTH_POLICIES:
        raise ValueError(f"zero_length: must be one of {ZERO_LENGTH_POLICIES}, got {zero_length!r}")
    B, T, H, HV, HS, K, V, N = check_inputs(q, k, v, g, beta, cu_seqlens, None, layout)
    want = (HS, K, V) if layout == "v_last" else (HS, V, K)
    if pool.dim() != 4 or tuple(pool.shape[1:]) != want:
        raise ValueError(f"pool: shape must be [P, {', '.join(map(str, want))}] ({layout}), got {tuple(pool.shape)}")
    P = pool.shape[0]
    reads = check_indices("read_indices", read_indices, N, P)
    writes = reads if write_indices is None else check_indices("write_indices", write_indices, N, P)
    dev = q.device
    if cu_seqlens is None:
        lens = [T] * N
        starts = [b * T for b in range(N)]
    else:
        c = cu_seqlens.tolist()
        lens = [c[i + 1] - c[i] for i in range(N)]
        starts = c[:-1]
    padded = [r < 0 for r in reads]
    if policy == "null_slot" and (any(padded) or any(w < 0 for w in writes)) and P == 0:
        raise ValueError("pool: policy 'null_slot' needs slot 0 (the null slot) but the pool is empty")
    if policy == "null_slot" and any(padded) or policy == "null_slot" and any(w < 0 for w in writes):
        live_writes = [w for w, p in zip(writes, padded) if not p and w >= 0]
        live_reads = [r for r, p in zip(reads, padded) if not p]
        if 0 in live_writes or 0 in live_reads:
            raise ValueError("read_indices/write_indices: slot 0 is the null slot under policy 'null_slot' "
                             "and cannot hold a live sequence while padding is present")
    if not disable_state_update:
        live = [w for w, p in zip(writes, padded) if not p and w >= 0]
        dup = sorted({w for w in live if live.count(w) > 1})
        if dup:
            raise ValueError(f"write_indices: duplicate live write slot(s) {dup}; each slot may be written once")

    pool64 = pool.to(device=dev, dtype=F64)
    src = [(0 if policy == "null_slot" else None) if p else r for r, p in zip(reads, padded)]
    S0 = torch.zeros(N, *want, dtype=F64, device=dev)
    for n, s in enumerate(src):
        if s is not None:
            S0[n] = pool64[s]
    res = gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=S0, cu_seqlens=cu_seqlens,
                           use_qk_l2norm=use_qk_l2norm, layout=layout,
                           output_intermediate=output_intermediate, form=form, chunk_size=chunk_size)

    o = res.o
    o_class = torch.full((B, T), OUT_ORACLE, dtype=torch.int8, device=dev)
    if output_init is None:
        output_init = torch.full((B, T, HS, V), float("nan"), dtype=F64, device=dev)
    elif tuple(output_init.shape) != (B, T, HS, V):
        raise ValueError(f"output_init: shape must be [{B}, {T}, {HS}, {V}], got {tuple(output_init.shape)}")
    o_flat, cls_flat = o.view(B * T, HS, V), o_class.view(B * T)
    init_flat = output_init.reshape(B * T, HS, V).to(device=dev, dtype=F64)
    inter = res.intermediate
    for n in range(N):
        if not padded[n]:
            continue
        sl = slice(starts[n], starts[n] + lens[n])
        if policy == "skip":
            o_flat[sl] = 0.0
        elif policy == "null_slot":
            cls_flat[sl] = OUT_UNDEFINED
        else:
            o_flat[sl] = init_flat[sl]
            cls_flat[sl] = OUT_CALLER

    expected = pool64.clone()
    row_class = torch.zeros(P, dtype=torch.int8, device=dev)
    if not disable_state_update:
        for n in range(N):
            w = writes[n]
            if padded[n]:
                if policy == "null_slot":
                    row_class[0] = ROW_UNDEFINED
                continue
            if w < 0:
                if policy == "null_slot":
                    row_class[0] = ROW_UNDEFINED
                continue
            if lens[n] == 0 and zero_length == "untouched":
                continue
            expected[w] = res.final_state[n]
            row_class[w] = ROW_WRITTEN
    return PoolResult(o=o, o_class=o_class, pool=expected, row_class=row_class, intermediate=inter)
