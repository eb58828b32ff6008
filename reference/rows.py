"""Prefill with separate read/write rows, checkpoints and paged state pools (FlashInfer 0.7.4 contracts).

Shapes as in :mod:`gdn` (packed varlen, B = 1)::

    q, k            [1, T, H, K]         v  [1, T, HV, V]       g, beta  [1, T, HS]  (g = log decay)
    cu_seqlens      [N + 1]
    pool            [P, HS, K, V] (v_last) / [P, HS, V, K] (k_last): read, written and checkpointed
    checkpoints     [C, HS, ...] a separate checkpoint tensor or pool

Contracts (``chunk_gated_delta_rule`` docstring and SM90 source, 0.7.4):

- ``state_indices[n]`` (read row): ``-1`` starts from the zero state (only together with
  ``output_state_indices``); read ids may repeat.
- ``output_state_indices[n]`` (write row): ``-1`` skips the final-state write. Without it the
  write row is the read row. A zero-length sequence writes nothing (its write row keeps its
  contents on SM90).
- checkpoints every ``n`` tokens (a multiple of 64): without ``prefix_lens`` after every ``n``-th
  new token (``seq_len // n`` of them); with ``prefix_lens`` at absolute positions ``m * n`` with
  ``prefix < m * n <= prefix + seq_len``. Checkpoint ``j`` of sequence ``i`` goes to row
  ``checkpoint_cu_starts[i] + j`` of the checkpoint tensor, or to row
  ``checkpoint_state_indices[checkpoint_cu_starts[i] + j]`` of a checkpoint pool (``-1`` skips).
  An unaligned prefix is padded with identity rows (gate 1, beta 0) that leave the state as it
  is: in exact arithmetic it changes nothing, so the oracle just continues from the read state.

Paged pools (``chunk_gated_delta_rule_paged``, ``gated_delta_rule_decode_paged``): a CSR page
table ``page_indices`` / ``page_indptr`` with ``page_size`` (a multiple of 64) tokens per page and
``last_page_len[n]`` in ``[1, page_size]`` tokens in the last page *after* the call. Page ``j``
of a sequence holds the state after its last token. :func:`paged_prefill_slots` and
:func:`paged_decode_slots` derive the rows exactly as FlashInfer's slot kernels do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .gating import F64
from .gdn import check_inputs, gated_delta_rule
from .layouts import check_layout
from .pool import OUT_ORACLE, ROW_UNDEFINED, ROW_UNTOUCHED, ROW_WRITTEN, PoolResult

__all__ = [
    "PagedPrefillSlots", "PagedDecodeSlots", "RowsResult", "paged_prefill_slots", "paged_decode_slots",
    "prefill_rows", "paged_prefill", "paged_decode", "checkpoint_count",
]


@dataclass
class PagedPrefillSlots:
    """Per-sequence rows of a paged prefill (lists of ``N`` ints), as ``gdn_paged_prefill_slots``."""

    state_indices: list[int]
    output_state_indices: list[int]
    checkpoint_cu_starts: list[int]
    prefix_lens: list[int]


@dataclass
class PagedDecodeSlots:
    """Per-sequence rows of a paged decode (lists of ``B`` ints), as ``gdn_paged_decode_slots``."""

    initial_state_indices: list[int]
    output_state_indices: list[int]


@dataclass
class RowsResult:
    """Expected outcome of :func:`prefill_rows`.

    Attributes:
        o: ``[1, T, HS, V]`` float64 expected output.
        pool: expected output-state tensor (pool or ``[N, ...]``), float64, ``row_class [rows]``
            (``ROW_*``); None when the call has no output-state tensor.
        checkpoints: expected checkpoint tensor, float64, with ``ckpt_class``; None without checkpoints.
        final_state: ``[N, HS, ...]`` float64 final state of each sequence (what a returned
            ``[N, ...]`` final state holds).
    """

    o: torch.Tensor
    pool: torch.Tensor | None
    row_class: torch.Tensor | None
    checkpoints: torch.Tensor | None
    ckpt_class: torch.Tensor | None
    final_state: torch.Tensor


def checkpoint_count(seq_len: int, every: int, prefix: int = 0) -> int:
    """Checkpoints of one sequence: ``(prefix + seq_len) // every - prefix // every``."""
    if every <= 0:
        return 0
    return (prefix + seq_len) // every - prefix // every


def _lens(cu_seqlens: torch.Tensor) -> list[int]:
    c = [int(x) for x in cu_seqlens.tolist()]
    return [b - a for a, b in zip(c, c[1:])]


def _check_page_table(page_indices, page_indptr, page_size: int, last_page_len, N: int) -> tuple[list, list, list]:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0 or page_size % 64:
        raise ValueError(f"page_size: a positive multiple of 64, got {page_size!r}")
    pi = [int(x) for x in torch.as_tensor(page_indices).tolist()]
    ptr = [int(x) for x in torch.as_tensor(page_indptr).tolist()]
    lpl = [int(x) for x in torch.as_tensor(last_page_len).tolist()]
    if len(ptr) != N + 1 or len(lpl) != N:
        raise ValueError(f"page_indptr: N + 1 = {N + 1} entries and last_page_len N = {N}, "
                         f"got {len(ptr)} and {len(lpl)}")
    if ptr[0] != 0 or ptr[-1] != len(pi) or any(b <= a for a, b in zip(ptr, ptr[1:])):
        raise ValueError(f"page_indptr: starts at 0, ends at len(page_indices), each sequence owns >= 1 page; got {ptr}")
    if any(not 1 <= x <= page_size for x in lpl):
        raise ValueError(f"last_page_len: each in [1, page_size={page_size}], got {lpl}")
    return pi, ptr, lpl


def paged_prefill_slots(cu_seqlens, page_indices, page_indptr, page_size: int, last_page_len) -> PagedPrefillSlots:
    """Rows of a paged prefill, the formulas of FlashInfer's ``gdn_paged_prefill_slots_kernel``.

    Per sequence: ``total = (pages - 1) * page_size + last_page_len``, ``prefix = total - seq_len``;
    read the page holding token ``prefix - 1`` (-1: empty prefix, zero state); write the last
    page unless there is no new token or ``total`` ends on a page boundary (then the final state
    is that page's checkpoint: -1); the first checkpoint entry is ``indptr + prefix // page_size``.
    """
    lens = _lens(torch.as_tensor(cu_seqlens))
    pi, ptr, lpl = _check_page_table(page_indices, page_indptr, page_size, last_page_len, len(lens))
    read, write, starts, prefix = [], [], [], []
    for n, L in enumerate(lens):
        first, end = ptr[n], ptr[n + 1]
        total = (end - first - 1) * page_size + lpl[n]
        p = total - L
        if p < 0:
            raise ValueError(f"sequence {n}: {L} new tokens do not fit its {total} tokens of pages")
        read.append(pi[first + (p - 1) // page_size] if p > 0 else -1)
        write.append(pi[end - 1] if L > 0 and total % page_size else -1)
        starts.append(first + p // page_size)
        prefix.append(p)
    return PagedPrefillSlots(read, write, starts, prefix)


def paged_decode_slots(page_indices, page_indptr, last_page_len) -> PagedDecodeSlots:
    """Rows of a paged decode: write the last page; read the previous page when the decoded token
    opens a new page (``last_page_len == 1``), else the last page (updated in place).

    Raises ValueError on the documented precondition (every sequence holds a token before the
    decoded one: ``last_page_len == 1`` needs >= 2 pages), which FlashInfer does not check.
    """
    pi = [int(x) for x in torch.as_tensor(page_indices).tolist()]
    ptr = [int(x) for x in torch.as_tensor(page_indptr).tolist()]
    lpl = [int(x) for x in torch.as_tensor(last_page_len).tolist()]
    read, write = [], []
    for n, L in enumerate(lpl):
        first, last = ptr[n], ptr[n + 1] - 1
        if last < first:
            raise ValueError(f"sequence {n}: owns no page")
        if L == 1 and last == first:
            raise ValueError(f"sequence {n}: last_page_len == 1 with one page (no token before the decoded one)")
        write.append(pi[last])
        read.append(pi[last - 1] if L == 1 else pi[last])
    return PagedDecodeSlots(read, write)


def prefill_rows(
    q, k, v, g, beta, *,
    cu_seqlens: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_state: torch.Tensor | None = None,
    state_indices: list[int] | None = None,
    output_state_indices: list[int] | None = None,
    output_final_state: bool = True,
    checkpoint_every: int = 0,
    state_checkpoints: torch.Tensor | None = None,
    checkpoint_cu_starts: list[int] | None = None,
    checkpoint_state_indices: list[int] | None = None,
    prefix_lens: list[int] | None = None,
    layout: str = "k_last",
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    form: str = "recurrent",
) -> RowsResult:
    """The oracle of one ``chunk_gated_delta_rule`` call with rows and checkpoints (module docstring).

    ``initial_state`` / ``output_state`` / ``state_checkpoints`` may be the same tensor (a shared
    pool: the expected tensor then carries every write). Rows named by no write are
    ``ROW_UNTOUCHED``. ``output_final_state=False``: the rows final states would go to are not part
    of the contract (``ROW_UNDEFINED``; SM90 stores into any output-state tensor it has), every
    other row is untouched and a distinct ``initial_state`` must stay untouched.
    """
    check_layout(layout)
    B, T, H, HV, HS, K, V, N = check_inputs(q, k, v, g, beta, cu_seqlens, None, layout)
    lens = _lens(cu_seqlens)
    starts_tok = [int(x) for x in cu_seqlens.tolist()[:-1]]
    want = (HS, K, V) if layout == "v_last" else (HS, V, K)
    dev = q.device
    if output_state_indices is not None and state_indices is None:
        raise ValueError("output_state_indices requires state_indices")
    if output_state_indices is not None and (output_state is None or not output_final_state):
        raise ValueError("output_state_indices requires an explicit output_state pool and output_final_state=True")
    if checkpoint_every < 0 or checkpoint_every % 64:
        raise ValueError(f"checkpoint_every_n_tokens: a non-negative multiple of 64, got {checkpoint_every}")
    if (checkpoint_state_indices is not None or prefix_lens is not None) and checkpoint_every == 0:
        raise ValueError("checkpoint_state_indices / prefix_lens require checkpoint_every_n_tokens > 0")
    if checkpoint_every and (state_checkpoints is None or checkpoint_cu_starts is None):
        raise ValueError("state_checkpoints and checkpoint_cu_starts must both be provided")
    reads = list(state_indices) if state_indices is not None else list(range(N))
    if state_indices is not None and output_state_indices is None:
        if any(r < 0 for r in reads):
            raise ValueError("state_indices: -1 has a meaning only with output_state_indices")
        if len(set(reads)) != len(reads):
            raise ValueError("state_indices: must be unique without output_state_indices")
    writes = list(output_state_indices) if output_state_indices is not None else reads
    pre = list(prefix_lens) if prefix_lens is not None else [0] * N

    # Initial states (read -1: zero state).
    S0 = torch.zeros(N, *want, dtype=F64, device=dev)
    if initial_state is not None:
        init64 = initial_state.to(device=dev, dtype=F64)
        for n, r in enumerate(reads):
            if r >= 0:
                S0[n] = init64[r]

    # Each sequence runs in segments that end at its checkpoints: the checkpoint is the segment's final state.
    o = torch.zeros(1, T, HS, v.shape[-1], dtype=F64, device=dev)
    final = torch.zeros(N, *want, dtype=F64, device=dev)
    ckpt_states: list[list[torch.Tensor]] = []
    for n, L in enumerate(lens):
        s0, t0 = starts_tok[n], 0
        cuts = []
        if checkpoint_every:
            m = pre[n] // checkpoint_every + 1
            while m * checkpoint_every <= pre[n] + L:
                cuts.append(m * checkpoint_every - pre[n])
                m += 1
        S = S0[n:n + 1]
        mine = []
        for end in cuts + ([L] if not cuts or cuts[-1] != L else []):
            if end > t0:
                sl = slice(s0 + t0, s0 + end)
                res = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], scale=scale,
                                       initial_state=S, use_qk_l2norm=use_qk_l2norm, layout=layout, form=form)
                o[:, sl] = res.o
                S = res.final_state
            if end in cuts:
                mine.append(S[0])
            t0 = end
        final[n] = S[0]
        ckpt_states.append(mine)

    pool = row_class = None
    if output_state is not None:
        pool = output_state.to(device=dev, dtype=F64).clone()
        row_class = torch.full((pool.shape[0],), ROW_UNTOUCHED, dtype=torch.int8, device=dev)
        if not output_final_state:  # the rows a final state would go to: SM90 may store there anyway
            for n, w in enumerate(writes):
                if w >= 0 and lens[n]:
                    row_class[w] = ROW_UNDEFINED
        else:
            for n, w in enumerate(writes):
                if w < 0 or lens[n] == 0:
                    continue
                pool[w] = final[n]
                row_class[w] = ROW_WRITTEN
    ck = ck_class = None
    if checkpoint_every:
        shared = state_checkpoints is output_state and pool is not None
        ck = pool if shared else state_checkpoints.to(device=dev, dtype=F64).clone()
        ck_class = row_class if shared else torch.full((ck.shape[0],), ROW_UNTOUCHED, dtype=torch.int8, device=dev)
        for n, states in enumerate(ckpt_states):
            for j, S in enumerate(states):
                e = checkpoint_cu_starts[n] + j
                row = checkpoint_state_indices[e] if checkpoint_state_indices is not None else e
                if row < 0:
                    continue
                ck[row] = S
                ck_class[row] = ROW_WRITTEN
    return RowsResult(o=o, pool=pool, row_class=row_class, checkpoints=ck, ckpt_class=ck_class, final_state=final)


def paged_prefill(q, k, v, g, beta, *, cu_seqlens, pool, page_indices, page_indptr, page_size: int,
                  last_page_len, layout: str = "k_last", scale: float | None = None,
                  use_qk_l2norm: bool = False, form: str = "recurrent") -> PoolResult:
    """The oracle of ``chunk_gated_delta_rule_paged``: one pool read, checkpointed and written.

    Returns a :class:`PoolResult` whose ``row_class`` marks every page written (checkpoints of
    crossed boundaries, the final state of the last page) and leaves all others untouched
    (full prefix pages, other sequences' pages, pages of zero-length sequences).
    """
    s = paged_prefill_slots(cu_seqlens, page_indices, page_indptr, page_size, last_page_len)
    pi = [int(x) for x in torch.as_tensor(page_indices).tolist()]
    r = prefill_rows(q, k, v, g, beta, cu_seqlens=cu_seqlens, initial_state=pool, output_state=pool,
                     state_indices=s.state_indices, output_state_indices=s.output_state_indices,
                     checkpoint_every=page_size, state_checkpoints=pool, checkpoint_cu_starts=s.checkpoint_cu_starts,
                     checkpoint_state_indices=pi, prefix_lens=s.prefix_lens, layout=layout, scale=scale,
                     use_qk_l2norm=use_qk_l2norm, form=form)
    T = q.shape[1]
    return PoolResult(o=r.o, o_class=torch.full((1, T), OUT_ORACLE, dtype=torch.int8, device=q.device),
                      pool=r.pool, row_class=r.row_class)


def paged_decode(q, k, v, g, beta, *, pool, page_indices, page_indptr, last_page_len, layout: str = "k_last",
                 scale: float | None = None, use_qk_l2norm: bool = True) -> PoolResult:
    """The oracle of ``gated_delta_rule_decode_paged`` (T = 1, q ``[B, 1, H, K]``): read the previous
    page when ``last_page_len == 1`` (which stays untouched), else the last page; write the last page."""
    B = q.shape[0]
    if q.shape[1] != 1:
        raise ValueError(f"paged decode: T = 1, got T={q.shape[1]}")
    s = paged_decode_slots(page_indices, page_indptr, last_page_len)
    if len(s.output_state_indices) != B:
        raise ValueError(f"page table: {len(s.output_state_indices)} sequences for B={B}")
    pool64 = pool.to(device=q.device, dtype=F64)
    S0 = torch.stack([pool64[r] for r in s.initial_state_indices])
    res = gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=S0, use_qk_l2norm=use_qk_l2norm,
                           layout=layout, form="recurrent")
    exp = pool64.clone()
    cls = torch.full((pool.shape[0],), ROW_UNTOUCHED, dtype=torch.int8, device=q.device)
    for n, w in enumerate(s.output_state_indices):
        exp[w] = res.final_state[n]
        cls[w] = ROW_WRITTEN
    return PoolResult(o=res.o, o_class=torch.full((B, 1), OUT_ORACLE, dtype=torch.int8, device=q.device),
                      pool=exp, row_class=cls)
