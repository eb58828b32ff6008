"""Pool semantics of ``pooled_gated_delta_rule``, shapes and indices drawn by Hypothesis.

For every call: rows classed ``ROW_UNTOUCHED`` are bit-identical to the input pool;
``ROW_WRITTEN`` rows equal the plain oracle's final state for the sequence that writes them;
padded outputs follow the policy (zeros for ``skip``, ``OUT_UNDEFINED`` for ``null_slot``,
the caller's values bit-for-bit for ``caller_value``); live outputs and intermediates equal the
plain oracle run on that sequence alone.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
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
    gated_delta_rule,
    pooled_gated_delta_rule,
)

F64 = torch.float64




def assert_rel(x, ref, what, rtol=1e-12):
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = (x.to(F64) - ref.to(F64)).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:g} * {scale:.3e}"


@st.composite
def pool_cases(draw):
    H, HV = draw(st.sampled_from([(1, 1), (2, 4), (1, 3), (4, 2)]))
    varlen = draw(st.booleans())
    N = draw(st.integers(1, 5))
    if varlen:
        lens = draw(st.lists(st.integers(0, 9), min_size=N, max_size=N))
    else:
        lens = [draw(st.integers(0, 9))] * N
    policy = draw(st.sampled_from(PADDING_POLICIES))
    first = 1 if policy == "null_slot" else 0  # slot 0 is reserved under null_slot
    P = draw(st.integers(first + N, first + N + 6))
    slots = list(range(first, P))
    pad = draw(st.lists(st.booleans(), min_size=N, max_size=N))
    reads = draw(st.permutations(slots))[:N]
    reads = [-1 if p else r for p, r in zip(pad, reads)]
    # occasionally a padded row uses another negative value
    reads = [draw(st.sampled_from([-1, -1, -7])) if r < 0 else r for r in reads]
    mode = draw(st.sampled_from(["same", "separate", "none"]))
    writes = None
    if mode == "separate":  # distinct live write slots that need not be the read slots
        perm = draw(st.permutations(slots))[:N]
        writes = [draw(st.sampled_from([w, w, w, -1])) for w in perm]
    elif mode == "none":  # explicit copy of the read indices
        writes = list(reads)
    return dict(
        H=H, HV=HV, K=draw(st.sampled_from([2, 4, 8])), V=draw(st.sampled_from([2, 4, 8])),
        varlen=varlen, lens=lens, P=P, reads=reads, writes=writes, policy=policy,
        zero_length=draw(st.sampled_from(ZERO_LENGTH_POLICIES)),
        disable=draw(st.booleans()), layout=draw(st.sampled_from(LAYOUTS)),
        pool_dtype=draw(st.sampled_from([F64, torch.float32, torch.bfloat16])),
        inter=draw(st.booleans()), form=draw(st.sampled_from(["recurrent", "chunked"])),
        caller_buf=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(c):
    gen = torch.Generator().manual_seed(c["seed"])
    H, HV, K, V, lens = c["H"], c["HV"], c["K"], c["V"], c["lens"]
    HS = max(H, HV)
    r = lambda *sh: torch.randn(*sh, generator=gen, dtype=F64)  # noqa: E731
    if c["varlen"]:
        B, T = 1, sum(lens)
        cu = torch.tensor([0] + lens).cumsum(0)
    else:
        B, T = len(lens), lens[0]
        cu = None
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, HV, V)
    g = -torch.rand(B, T, HS, generator=gen, dtype=F64)
    beta = torch.rand(B, T, HS, generator=gen, dtype=F64)
    shape = (c["P"], HS, K, V) if c["layout"] == "v_last" else (c["P"], HS, V, K)
    pool = r(*shape).to(c["pool_dtype"])
    out0 = 10 + r(B, T, HS, V) if c["caller_buf"] else None
    return q, k, v, g, beta, cu, pool, out0


def seq_slice(c, n):
    """(batch row, token slice) of sequence n."""
    if c["varlen"]:
        s = sum(c["lens"][:n])
        return 0, slice(s, s + c["lens"][n])
    return n, slice(0, c["lens"][0])


@given(pool_cases())
def test_pool_policies(c):
    q, k, v, g, beta, cu, pool, out0 = build(c)
    pool_before = pool.clone()
    reads = torch.tensor(c["reads"])
    writes = None if c["writes"] is None else torch.tensor(c["writes"])
    res = pooled_gated_delta_rule(
        q, k, v, g, beta, pool=pool, read_indices=reads, write_indices=writes, policy=c["policy"],
        zero_length=c["zero_length"], disable_state_update=c["disable"], cu_seqlens=cu, layout=c["layout"],
        use_qk_l2norm=True, output_init=out0, output_intermediate=c["inter"], form=c["form"], chunk_size=4)
    assert torch.equal(pool, pool_before), "the oracle modified the input pool"
    N, P = len(c["lens"]), c["P"]
    pool64 = pool.to(F64)
    wlist = c["reads"] if c["writes"] is None else c["writes"]
    assert res.pool.dtype == F64 and res.pool.shape == pool.shape
    assert res.row_class.shape == (P,) and res.o_class.shape == q.shape[:2]

    # 1. untouched rows are bit-identical to the input pool
    untouched = res.row_class == ROW_UNTOUCHED
    assert torch.equal(res.pool[untouched], pool64[untouched])

    # 2. which rows are written, and with what
    expect_written = {}
    undefined_zero = False
    for n in range(N):
        padded, w = c["reads"][n] < 0, wlist[n]
        if c["disable"]:
            continue
        if padded or w < 0:
            undefined_zero |= c["policy"] == "null_slot"
            continue
        if c["lens"][n] == 0 and c["zero_length"] == "untouched":
            continue
        expect_written[w] = n
    for p in range(P):
        if p in expect_written:
            assert res.row_class[p] == ROW_WRITTEN, p
        elif p == 0 and undefined_zero:
            assert res.row_class[p] == ROW_UNDEFINED
        else:
            assert res.row_class[p] == ROW_UNTOUCHED, p
    if c["disable"]:
        assert (res.row_class == ROW_UNTOUCHED).all() and torch.equal(res.pool, pool64)

    # 3. written rows and live outputs equal the plain oracle on each sequence alone
    for n in range(N):
        b, sl = seq_slice(c, n)
        L = c["lens"][n]
        o_n, cls_n = res.o[b, sl], res.o_class[b, sl]
        rd = c["reads"][n]
        if rd < 0:
            if c["policy"] == "skip":
                assert (cls_n == OUT_ORACLE).all() and (o_n == 0).all()
            elif c["policy"] == "null_slot":
                assert (cls_n == OUT_UNDEFINED).all()
            else:
                assert (cls_n == OUT_CALLER).all()
                if out0 is not None:
                    assert torch.equal(o_n, out0[b, sl])
                else:
                    assert torch.isnan(o_n).all()  # poisoned: the caller's buffer was not given
            continue
        assert (cls_n == OUT_ORACLE).all()
        alone = gated_delta_rule(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], g[b:b + 1, sl], beta[b:b + 1, sl],
                                 initial_state=pool64[rd:rd + 1], use_qk_l2norm=True, layout=c["layout"],
                                 output_intermediate=True, form="recurrent")
        assert_rel(o_n, alone.o[0], f"o seq {n}")
        if c["inter"]:
            assert_rel(res.intermediate[b, sl], alone.intermediate[0], f"intermediate seq {n}")
        w = wlist[n]
        if expect_written.get(w) == n:
            assert_rel(res.pool[w], alone.final_state[0], f"pool row {w} (seq {n})")
            if L == 0:  # passthrough of a zero-length sequence: the read slot's state, bit for bit
                assert torch.equal(res.pool[w], pool64[rd])
    if not c["inter"]:
        assert res.intermediate is None


def test_null_slot_padded_row_reads_slot_zero():
    """Under null_slot a padded row computes from slot 0 (its output is undefined, but the
    oracle's value is the one a kernel reading slot 0 produces) and slot 0 becomes undefined."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 1, 4, generator=gen, dtype=F64), torch.randn(2, 3, 1, 4, generator=gen, dtype=F64)
    v = torch.randn(2, 3, 1, 4, generator=gen, dtype=F64)
    g, beta = -torch.rand(2, 3, 1, generator=gen, dtype=F64), torch.rand(2, 3, 1, generator=gen, dtype=F64)
    pool = torch.randn(3, 1, 4, 4, generator=gen, dtype=F64)
    res = pooled_gated_delta_rule(q, k, v, g, beta, pool=pool, read_indices=torch.tensor([-1, 2]),
                                  policy="null_slot", form="recurrent")
    alone = gated_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1], initial_state=pool[:1], form="recurrent")
    assert_rel(res.o[0], alone.o[0], "padded row's output", rtol=1e-14)
    assert res.o_class[0].tolist() == [OUT_UNDEFINED] * 3 and res.o_class[1].tolist() == [OUT_ORACLE] * 3
    assert res.row_class.tolist() == [ROW_UNDEFINED, ROW_UNTOUCHED, ROW_WRITTEN]
    # with the state update disabled slot 0 is untouched
    res = pooled_gated_delta_rule(q, k, v, g, beta, pool=pool, read_indices=torch.tensor([-1, 2]),
                                  policy="null_slot", disable_state_update=True)
    assert res.row_class.tolist() == [ROW_UNTOUCHED] * 3 and torch.equal(res.pool, pool)


@pytest.mark.parametrize("zero_length", ZERO_LENGTH_POLICIES)
def test_zero_length_sequences(zero_length):
    """A zero-length sequence (CUDA-graph padding) with a live index: passthrough copies the
    read slot's state to the write slot; untouched leaves the pool alone."""
    q = torch.zeros(1, 3, 1, 2, dtype=F64)
    q[0, :, 0, 0] = 1.0
    g, beta = torch.zeros(1, 3, 1, dtype=F64), torch.ones(1, 3, 1, dtype=F64)
    pool = torch.arange(5 * 4, dtype=torch.float32).view(5, 1, 2, 2)
    res = pooled_gated_delta_rule(q, q, q, g, beta, pool=pool, read_indices=torch.tensor([1, 2]),
                                  write_indices=torch.tensor([3, 4]), cu_seqlens=torch.tensor([0, 0, 3]),
                                  zero_length=zero_length)
    if zero_length == "passthrough":
        assert res.row_class.tolist() == [ROW_UNTOUCHED] * 3 + [ROW_WRITTEN] * 2
        assert torch.equal(res.pool[3], pool[1].to(F64))
    else:
        assert res.row_class.tolist() == [ROW_UNTOUCHED] * 4 + [ROW_WRITTEN]
        assert torch.equal(res.pool[3], pool[3].to(F64))
    assert torch.equal(res.pool[:3], pool[:3].to(F64))
