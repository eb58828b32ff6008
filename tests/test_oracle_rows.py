"""Separate read/write rows, checkpoints and paged pools (``gdncheck_reference.rows``) against an
independent scalar token loop that walks absolute positions and writes pages by hand.

Error model: both sides are float64 over <= 200 tokens of O(1) values: agreement to 1e-12 relative.
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gdncheck_reference import (
    ROW_UNDEFINED,
    ROW_UNTOUCHED,
    ROW_WRITTEN,
    checkpoint_count,
    paged_decode,
    paged_decode_slots,
    paged_prefill,
    paged_prefill_slots,
    prefill_rows,
)

F64 = torch.float64
TOL = 1e-12


def loop_step(S, q, k, v, g, b, scale):
    """One token, one head, K-last state ``[V, K]``: decay, delta update, output."""
    S = S * torch.exp(g)
    u = b * (v - S @ k)
    S = S + torch.outer(u, k)
    return S, S @ (q * scale)


def loop_seq(S, q, k, v, g, beta, scale):
    """Tokens ``[L, HS, *]`` one at a time, H = HV = HS. Returns (outputs ``[L, HS, V]``, states after each token)."""
    L, HS = g.shape
    outs, states = [], []
    S = S.clone()
    for t in range(L):
        o = torch.empty(HS, S.shape[1], dtype=F64)
        for h in range(HS):
            S[h], o[h] = loop_step(S[h], q[t, h], k[t, h], v[t, h], g[t, h], beta[t, h], scale)
        outs.append(o)
        states.append(S.clone())
    return (torch.stack(outs) if outs else torch.empty(0, HS, S.shape[1], dtype=F64)), states


def data(T, HS=2, K=4, V=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, HS, K, generator=gen, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(1, T, HS, K, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(1, T, HS, V, generator=gen, dtype=F64)
    g = -0.3 * torch.rand(1, T, HS, generator=gen, dtype=F64)
    beta = torch.rand(1, T, HS, generator=gen, dtype=F64)
    return q, k, v, g, beta


def close(x, ref, what):
    assert x.shape == ref.shape, what
    if not ref.numel():
        return
    err = (x - ref).abs().max().item()
    assert err <= TOL * max(1.0, ref.abs().max().item()), f"{what}: {err:.3e}"


def page_table(draw_lens, page_size, rng, P_extra=3):
    """Random page table: per sequence (prefix, new) -> pages of distinct random ids."""
    pages, ptr, lpl, ids = [], [0], [], list(range(1, 200))
    rng.shuffle(ids)
    for prefix, new in draw_lens:
        total = prefix + new
        n_pages = max(1, -(-total // page_size))
        pages += [ids.pop() for _ in range(n_pages)]
        ptr.append(len(pages))
        lpl.append(total - (n_pages - 1) * page_size if total else 1)
    return pages, ptr, lpl, max(pages) + 1 + P_extra


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 150)), min_size=1, max_size=3),
       st.sampled_from([64, 128]), st.integers(0, 2**16))
def test_paged_prefill_against_page_loop(seqs, page_size, seed):
    # a sequence with no tokens at all (prefix 0, new 0) cannot describe last_page_len >= 1
    seqs = [(p, n) if p + n > 0 else (1, 0) for p, n in seqs]
    rng = random.Random(seed)
    pages, ptr, lpl, P = page_table(seqs, page_size, rng)
    lens = [n for _, n in seqs]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    T, HS, K, V = sum(lens), 2, 4, 3
    q, k, v, g, beta = data(T, HS, K, V, seed)
    pool = torch.randn(P, HS, V, K, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    res = paged_prefill(q, k, v, g, beta, cu_seqlens=cu, pool=pool, page_indices=torch.tensor(pages),
                        page_indptr=torch.tensor(ptr), page_size=page_size, last_page_len=torch.tensor(lpl))

    exp_pool, written = pool.clone(), set()
    exp_o = torch.zeros(1, T, HS, V, dtype=F64)
    for n, (prefix, new) in enumerate(seqs):
        mine = pages[ptr[n]:ptr[n + 1]]
        S0 = pool[mine[(prefix - 1) // page_size]] if prefix else torch.zeros(HS, V, K, dtype=F64)
        sl = slice(int(cu[n]), int(cu[n + 1]))
        o, states = loop_seq(S0, q[0, sl], k[0, sl], v[0, sl], g[0, sl], beta[0, sl], K ** -0.5)
        exp_o[0, sl] = o
        for t, S in enumerate(states):
            pos = prefix + t + 1  # absolute tokens after this one
            if pos % page_size == 0 or t == new - 1:
                row = mine[(pos - 1) // page_size]
                exp_pool[row] = S
                written.add(row)
        # full prefix pages (ending at or before the prefix) are never written
        for j in range(prefix // page_size):
            assert res.row_class[mine[j]] == ROW_UNTOUCHED
    close(res.o, exp_o, "output")
    close(res.pool, exp_pool, "pool")
    assert {i for i in range(P) if res.row_class[i] == ROW_WRITTEN} == written
    assert torch.equal(res.pool[res.row_class == ROW_UNTOUCHED], pool[res.row_class == ROW_UNTOUCHED])


def test_paged_prefill_slots_examples():
    # seq 0: prefix 70 (page 1 of 64 is full, page 2 holds tokens 64..69), 10 new tokens -> 80 total;
    # seq 1: no prefix, 128 new (ends on a page boundary: the final state is the checkpoint, write -1);
    # seq 2: zero-length (prefix 5).
    cu = torch.tensor([0, 10, 138, 138])
    s = paged_prefill_slots(cu, [11, 12, 21, 22, 31], [0, 2, 4, 5], 64, [16, 64, 5])
    assert s.state_indices == [12, -1, 31]
    assert s.output_state_indices == [12, -1, -1]
    assert s.checkpoint_cu_starts == [1, 2, 4]
    assert s.prefix_lens == [70, 0, 5]
    assert [checkpoint_count(n, 64, p) for n, p in ((10, 70), (128, 0), (0, 5))] == [0, 2, 0]


def test_paged_prefill_zero_length_leaves_pool():
    q, k, v, g, beta = data(0)
    pool = torch.randn(4, 2, 3, 4, dtype=F64)
    res = paged_prefill(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 0]), pool=pool, page_indices=torch.tensor([1, 2]),
                        page_indptr=torch.tensor([0, 2]), page_size=64, last_page_len=torch.tensor([3]))
    assert (res.row_class == ROW_UNTOUCHED).all() and torch.equal(res.pool, pool)


@pytest.mark.parametrize("bad", [dict(page_size=96), dict(page_size=0), dict(last_page_len=[65]), dict(last_page_len=[0])])
def test_paged_prefill_rejects_what_flashinfer_rejects(bad):
    kw = dict(page_size=64, last_page_len=[5])
    kw.update(bad)
    with pytest.raises(ValueError):
        paged_prefill_slots(torch.tensor([0, 5]), [1], [0, 1], kw["page_size"], kw["last_page_len"])


def test_paged_decode_new_page_reads_previous():
    # seq 0: opens a new page (last_page_len 1): read page 4, write page 7, page 4 untouched;
    # seq 1: continues its page 9 in place.
    s = paged_decode_slots([4, 7, 9], [0, 2, 3], [1, 30])
    assert s.initial_state_indices == [4, 9] and s.output_state_indices == [7, 9]
    HS, K, V = 2, 4, 3
    q, k, v, g, beta = (x.reshape(2, 1, *x.shape[2:]) for x in data(2, HS, K, V))
    pool = torch.randn(10, HS, V, K, dtype=F64)
    res = paged_decode(q, k, v, g, beta, pool=pool, page_indices=[4, 7, 9], page_indptr=[0, 2, 3],
                       last_page_len=[1, 30], use_qk_l2norm=False)
    for n, (r, w) in enumerate(((4, 7), (9, 9))):
        o, states = loop_seq(pool[r], q[n], k[n], v[n], g[n], beta[n], K ** -0.5)
        close(res.o[n], o, "output")
        close(res.pool[w], states[-1], "written page")
    assert res.row_class[4] == ROW_UNTOUCHED and torch.equal(res.pool[4], pool[4])
    assert sorted(i for i in range(10) if res.row_class[i] == ROW_WRITTEN) == [7, 9]


def test_paged_decode_precondition():
    with pytest.raises(ValueError, match="last_page_len == 1"):
        paged_decode_slots([4], [0, 1], [1])


def test_prefill_rows_read_minus_one_repeat_and_write_skip():
    lens = [5, 0, 7, 3]
    cu = torch.tensor([0, 5, 5, 12, 15])
    q, k, v, g, beta = data(15)
    pool = torch.randn(8, 2, 3, 4, dtype=F64)
    reads, writes = [-1, 2, 2, 2], [5, 6, -1, 7]  # read 2 repeats; seq 1 zero-length; seq 2 write skipped
    r = prefill_rows(q, k, v, g, beta, cu_seqlens=cu, initial_state=pool, output_state=pool,
                     state_indices=reads, output_state_indices=writes)
    for n, (rd, w) in enumerate(zip(reads, writes)):
        S0 = pool[rd] if rd >= 0 else torch.zeros(2, 3, 4, dtype=F64)
        sl = slice(int(cu[n]), int(cu[n + 1]))
        o, states = loop_seq(S0, q[0, sl], k[0, sl], v[0, sl], g[0, sl], beta[0, sl], 0.5)
        close(r.o[0, sl], o, f"output {n}")
        if w >= 0 and lens[n]:
            close(r.pool[w], states[-1], f"row {w}")
    assert sorted(i for i in range(8) if r.row_class[i] == ROW_WRITTEN) == [5, 7]  # 6: zero-length, untouched
    assert torch.equal(r.pool[r.row_class == ROW_UNTOUCHED], pool[r.row_class == ROW_UNTOUCHED])


def test_prefill_rows_contract_errors():
    q, k, v, g, beta = data(4)
    cu = torch.tensor([0, 4])
    pool = torch.zeros(3, 2, 3, 4, dtype=F64)
    with pytest.raises(ValueError, match="requires state_indices"):
        prefill_rows(q, k, v, g, beta, cu_seqlens=cu, initial_state=pool, output_state=pool, output_state_indices=[1])
    with pytest.raises(ValueError, match="output_final_state=True"):
        prefill_rows(q, k, v, g, beta, cu_seqlens=cu, initial_state=pool, output_state=pool, state_indices=[0],
                     output_state_indices=[1], output_final_state=False)
    with pytest.raises(ValueError, match="multiple of 64"):
        prefill_rows(q, k, v, g, beta, cu_seqlens=cu, checkpoint_every=32, state_checkpoints=pool, checkpoint_cu_starts=[0, 0])
    with pytest.raises(ValueError, match="unique"):
        prefill_rows(q[:, :2], k[:, :2], v[:, :2], g[:, :2], beta[:, :2], cu_seqlens=torch.tensor([0, 1, 2]),
                     initial_state=pool, output_state=pool, state_indices=[1, 1])


@pytest.mark.parametrize("prefix", [None, [0, 30]])
def test_checkpoints_every_n(prefix):
    lens = [130, 100]
    cu = torch.tensor([0, 130, 230])
    q, k, v, g, beta = data(230, seed=3)
    pre = prefix or [0, 0]
    counts = [checkpoint_count(L, 64, p) for L, p in zip(lens, pre)]
    assert counts == ([2, 1] if prefix is None else [2, 2])
    starts = [0, counts[0], sum(counts)]
    ck0 = torch.full((sum(counts), 2, 3, 4), 7.0, dtype=F64)
    r = prefill_rows(q, k, v, g, beta, cu_seqlens=cu, checkpoint_every=64, state_checkpoints=ck0,
                     checkpoint_cu_starts=starts, prefix_lens=prefix)
    assert (r.ckpt_class == ROW_WRITTEN).all()
    row = 0
    for n, L in enumerate(lens):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        _, states = loop_seq(torch.zeros(2, 3, 4, dtype=F64), q[0, sl], k[0, sl], v[0, sl], g[0, sl], beta[0, sl], 0.5)
        for t in range(L):
            if (pre[n] + t + 1) % 64 == 0:
                close(r.checkpoints[row], states[t], f"checkpoint {row}")
                row += 1
    assert row == sum(counts)


def test_output_final_state_false_leaves_input_pool():
    q, k, v, g, beta = data(6)
    pool = torch.randn(4, 2, 3, 4, dtype=F64)
    scratch = torch.zeros(4, 2, 3, 4, dtype=F64)
    r = prefill_rows(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 6]), initial_state=pool, output_state=scratch,
                     state_indices=[2], output_final_state=False)
    assert r.row_class[2] == ROW_UNDEFINED and (r.row_class[[0, 1, 3]] == ROW_UNTOUCHED).all()
    _, states = loop_seq(pool[2], q[0], k[0], v[0], g[0], beta[0], 0.5)
    close(r.final_state[0], states[-1], "final state")
