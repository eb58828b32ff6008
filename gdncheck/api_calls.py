"""Entry-point arguments of a case (``Case.call`` plus the fields that already say them), the page
tables of paged cases, and the oracle of calls the plain pool oracle cannot express.

Design: a case pins an argument either through a field that already means it (``pool_size`` /
``read_indices`` / ``write_indices`` are ``state_indices`` / ``output_state_indices``, ``l2norm`` is
``use_qk_l2norm*``, ``state_dtype``...) or through ``Case.call`` (name -> value, the values of the
backend's :class:`~gdncheck.backends.api_spec.ArgSpec`). :func:`arg_values` reads both into one
``{argument: value}`` map: the coverage table and the backends use it, so a case says each value once.

Paged cases (``call["page_size"]``): sequence ``n`` has ``prefix_lens[n]`` tokens before the call
and ``seqlens[n]`` new ones (decode: 1); its pages are numbered from slot 1 in sequence order,
``ceil(total / page_size)`` of them (``shared_prefix``: sequences with the same prefix share its
full pages, which belong to sequence 0). The case's ``read_indices`` / ``write_indices`` must be
the rows FlashInfer derives (``gdncheck_reference.paged_*_slots``): :func:`paged_case_fields`
computes them for suite generators.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdncheck.data.case import Case
from gdncheck.inputs import Inputs
from gdncheck_reference import (
    OUT_ORACLE,
    ROW_UNDEFINED,
    ROW_UNTOUCHED,
    ROW_WRITTEN,
    PoolResult,
    beta_from_logit,
    gates_in_kernel,
    paged_decode_slots,
    paged_prefill_slots,
    prefill_rows,
    sm90_log_alpha,
)

F64 = torch.float64


# ------------------------------------------------------------------------------ page tables

@dataclass
class PageTable:
    page_indices: list[int]
    page_indptr: list[int]
    last_page_len: list[int]
    page_size: int
    prefix_lens: list[int]
    pool_size: int


def prefix_list(case: Case) -> list[int]:
    """Numeric ``prefix_lens`` of a case: a list, or a symbolic value applied to every sequence."""
    p = case.call.get("prefix_lens", "empty")
    ps = int(case.call.get("page_size", 64))
    if isinstance(p, list):
        return [int(x) for x in p]
    per = {"empty": 0, "absent": 0, "aligned": ps, "unaligned": 37, "page_interior": ps + 37}.get(p)
    if per is None:
        raise ValueError(f"call.prefix_lens: a list or one of empty, aligned, unaligned, page_interior; got {p!r}")
    # a zero-length sequence always has history (a page with >= 1 token): 5 tokens when the value says none
    return [per if per or case.op != "prefill" or case.seqlens[n] else 5 for n in range(case.N)]


def page_table(case: Case) -> PageTable:
    """The CSR page table of a paged case (module docstring)."""
    ps = int(case.call["page_size"])
    pre = prefix_list(case)
    new = [1] * case.N if case.op == "decode" else list(case.seqlens)
    shared = bool(case.call.get("shared_prefix", False))
    pages, ptr, lpl, nxt, first_full = [], [0], [], 1, []
    for n in range(case.N):
        total = pre[n] + new[n]
        if total == 0:
            raise ValueError(f"sequence {n}: no tokens at all (last_page_len must be >= 1)")
        count, full = -(-total // ps), pre[n] // ps
        if shared and n > 0 and pre[n] == pre[0]:
            mine = list(first_full)
        else:
            mine = list(range(nxt, nxt + full))
            nxt += full
            if n == 0:
                first_full = list(mine)
        rest = count - len(mine)
        mine += list(range(nxt, nxt + rest))
        nxt += rest
        pages += mine
        ptr.append(len(pages))
        lpl.append(total - (count - 1) * ps)
    return PageTable(pages, ptr, lpl, ps, pre, nxt + 1)


def paged_case_fields(op: str, seqlens: list[int], call: dict) -> dict:
    """``pool_size``, ``read_indices``, ``write_indices`` of a paged case, derived as FlashInfer does."""
    probe = Case(op=op, seqlens=seqlens, call=call)
    pt = page_table(probe)
    if op == "decode":
        s = paged_decode_slots(pt.page_indices, pt.page_indptr, pt.last_page_len)
        read, write = s.initial_state_indices, s.output_state_indices
    else:
        cu = torch.tensor([0] + torch.tensor(seqlens).cumsum(0).tolist())
        s = paged_prefill_slots(cu, pt.page_indices, pt.page_indptr, pt.page_size, pt.last_page_len)
        read, write = s.state_indices, s.output_state_indices
    return {"pool_size": pt.pool_size, "read_indices": read, "write_indices": write}


# ------------------------------------------------------------------------------ argument values

def arg_values(entry: str, case: Case) -> dict:
    """``{argument: value}`` of ``case`` for entry point ``entry`` (values as in api_spec)."""
    c = case.call
    reads = case.read_indices or []
    writes = case.write_indices
    if entry == "chunk_gated_delta_rule":
        if case.pool_size is None:
            si = "absent"
        elif any(r < 0 for r in reads):
            si = "minus_one"
        elif len(set(reads)) != len(reads):
            si = "repeated"
        else:
            si = "unique"
        osi = "absent" if writes is None else ("minus_one" if any(w < 0 for w in writes) else "present")
        every = int(c.get("checkpoint_every_n_tokens", 0))
        return {
            "initial_state": c.get("initial_state", "present"),
            "output_final_state": c.get("output_final_state", True),
            "output_state": c.get("output_state", "same_as_initial" if case.pool_size else "separate"),
            "state_indices": si, "output_state_indices": osi,
            "checkpoint_every_n_tokens": every,
            "checkpoint_state_indices": c.get("checkpoint_state_indices", "absent"),
            "prefix_lens": c.get("prefix_lens", "absent"),
            "use_cp": c.get("use_cp", "auto"), "backend": c.get("backend", "auto"),
            "gate_domain": c.get("gate_domain", "linear"), "use_gate_in_kernel": c.get("use_gate_in_kernel", False),
            "beta_is_logit": c.get("beta_is_logit", False), "cu_seqlens_cpu": c.get("cu_seqlens_cpu", "absent"),
            "max_seqlen": c.get("max_seqlen", "absent"), "use_qk_l2norm_in_kernel": case.l2norm,
            "A_log": "present" if c.get("use_gate_in_kernel", False) else "absent",
        }
    if entry == "chunk_gated_delta_rule_paged":
        p = c.get("prefix_lens", "empty")
        return {"page_size": c.get("page_size"), "prefix_lens": p if isinstance(p, str) else "explicit",
                "zero_length": any(s == 0 for s in case.seqlens),
                "gate_domain": c.get("gate_domain", "linear"), "use_gate_in_kernel": c.get("use_gate_in_kernel", False),
                "beta_is_logit": c.get("beta_is_logit", False), "use_qk_l2norm_in_kernel": case.l2norm,
                "slots": c.get("slots", "absent")}
    if entry == "gated_delta_rule_decode_paged":
        pt = page_table(case)
        lpl = {("one" if x == 1 else "full" if x == pt.page_size else "interior") for x in pt.last_page_len}
        return {"use_qk_l2norm": case.l2norm, "last_page_len": sorted(lpl), "state_dtype": case.state_dtype,
                "slots": c.get("slots", "absent"), "backend": c.get("backend", "auto")}
    if entry in ("gated_delta_rule_decode", "gated_delta_rule_decode_pretranspose"):
        out = {"use_qk_l2norm": case.l2norm, "backend": c.get("backend", "auto")}
        if entry.endswith("pretranspose"):
            out.update(initial_state="pool" if case.pool_size else "absent",
                       initial_state_indices="absent" if not case.pool_size else
                       ("minus_one" if any(r < 0 for r in reads) else "present"),
                       output_state_indices="absent" if writes is None else
                       ("minus_one" if any(w < 0 for w in writes) else "present"),
                       intermediate_states_buffer="present" if case.intermediate else "absent",
                       disable_state_update=case.disable_state_update)
        return out
    if entry in ("gated_delta_rule_mtp", "cake_gated_delta_product_mtp"):
        return {"use_qk_l2norm": case.l2norm,
                "initial_state_indices": "minus_one" if any(r < 0 for r in reads) else "present",
                "output_state_indices": "absent" if writes is None else
                ("minus_one" if any(w < 0 for w in writes) else "present"),
                "ssm_state_indices": c.get("ssm_state_indices", "absent"),
                "disable_state_update": case.disable_state_update,
                **({"intermediate_states_buffer": "present" if case.intermediate else "absent",
                    "cache_replayssm": False} if entry == "gated_delta_rule_mtp" else {})}
    raise KeyError(entry)


# ------------------------------------------------------------------------------ prefill call

def checkpoint_plan(case: Case) -> tuple[list[int], list[int] | None, int]:
    """(checkpoint_cu_starts ``[N + 1]``, checkpoint_state_indices or None, checkpoint count C).

    Without ``checkpoint_state_indices`` checkpoints go to a separate ``[C, ...]`` tensor (plain-state
    cases only: its rows follow the N final-state rows in ``Outputs.state``). With it they go to the
    case pool's free rows (named by no read or write index), highest first; ``minus_one``: every
    other entry is -1 (that checkpoint is skipped)."""
    from gdncheck_reference import checkpoint_count
    every = int(case.call.get("checkpoint_every_n_tokens", 0))
    pre = prefix_list(case) if case.call.get("prefix_lens", "absent") != "absent" else [0] * case.N
    counts = [checkpoint_count(L, every, p) for L, p in zip(case.seqlens, pre)]
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    C = starts[-1]
    mode = case.call.get("checkpoint_state_indices", "absent")
    if mode == "absent":
        return starts, None, C
    used = set(case.read_indices or []) | set(case.write_indices or [])
    free = [r for r in range((case.pool_size or 0) - 1, -1, -1) if r not in used]
    if len(free) < C:
        raise ValueError(f"checkpoint_state_indices: {C} checkpoints need {C} free pool rows, the pool has {len(free)}")
    rows = free[:C]
    if mode == "minus_one":
        rows = [-1 if j % 2 else r for j, r in enumerate(rows)]
    return starts, rows, C


def prefill_gates(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(g, beta, kwargs)`` exactly as the adapter passes them to ``chunk_gated_delta_rule``
    (``[T, HS]``), and the gate keyword arguments."""
    c = inputs.case.call
    kw = {}
    if c.get("use_gate_in_kernel", False):
        g = inputs.a[0].contiguous()
        kw.update(use_gate_in_kernel=True, A_log=inputs.A_log, dt_bias=inputs.dt_bias)
    elif c.get("gate_domain", "linear") == "log":
        g = inputs.g[0].float().contiguous()
        kw.update(gate_domain="log")
    else:
        g = torch.exp(inputs.g[0].float()).contiguous()
        if "gate_domain" in c:  # "linear" passed explicitly, or an invalid value the kernel must reject
            kw.update(gate_domain=c["gate_domain"])
    if c.get("beta_is_logit", False):
        beta = inputs.b[0].contiguous()
        kw.update(beta_is_logit=True)
    else:
        beta = inputs.beta[0].contiguous()
    return g, beta, kw


def oracle_gates(inputs: Inputs, g: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 log decay and beta ``[1, T, HS]`` the SM90 kernel applies for the gate arguments it got."""
    c = inputs.case.call
    if c.get("use_gate_in_kernel", False):
        lg = gates_in_kernel(inputs.A_log, g, inputs.dt_bias)
    elif c.get("gate_domain", "linear") == "log":
        lg = g.double()
    else:
        lg = torch.log(g.double())
    b64 = beta_from_logit(beta) if c.get("beta_is_logit", False) else beta.double()
    return sm90_log_alpha(lg)[None], b64[None]


def expected_prefill_call(inputs: Inputs) -> PoolResult:
    """The oracle of one ``chunk_gated_delta_rule`` call of ``flashinfer-prefill-args``.

    ``pool`` / ``row_class`` match the adapter's ``Outputs.state``: the pool (pool cases: output
    state and checkpoints share it; a separate ``output_state`` pool starts as a copy of it) or,
    for plain-state cases, the ``[N, ...]`` final states (a separate checkpoint tensor is checked
    by the adapter for presence only).
    ``output_final_state=False``: output-state rows are not part of the contract
    (``ROW_UNDEFINED``: SM90 stores into any tensor it has), but a pool the call only reads
    (``output_state`` absent) must stay untouched.
    """
    case = inputs.case
    g, beta, _ = prefill_gates(inputs)
    g64, b64 = oracle_gates(inputs, g, beta)
    starts, ck_rows, C = checkpoint_plan(case)
    every = int(case.call.get("checkpoint_every_n_tokens", 0))
    pooled = case.pool_size is not None
    ofs = case.call.get("output_final_state", True)
    ostate = case.call.get("output_state", "same_as_initial" if pooled else "separate")
    has_init = case.call.get("initial_state", "present") == "present"
    st = inputs.state.double()
    nan = lambda n: torch.full((n, *st.shape[1:]), float("nan"), dtype=F64, device=st.device)  # noqa: E731
    pre = prefix_list(case) if every and case.call.get("prefix_lens", "absent") != "absent" else None
    if pooled:
        out0 = st.clone()
        init = (out0 if ostate == "same_as_initial" else st) if has_init else None
        ck0 = out0 if every else None
    else:
        out0, init, ck0 = nan(case.N), (st if has_init else None), (nan(C) if every else None)
    r = prefill_rows(inputs.q, inputs.k, inputs.v, g64, b64, cu_seqlens=inputs.cu_seqlens.cpu(),
                     initial_state=init, output_state=out0, state_indices=case.read_indices if pooled else None,
                     output_state_indices=case.write_indices if pooled else None,
                     output_final_state=ofs if case.write_indices is None else True, checkpoint_every=every,
                     state_checkpoints=ck0, checkpoint_cu_starts=starts, checkpoint_state_indices=ck_rows,
                     prefix_lens=pre, layout=case.layout, scale=case.scale, use_qk_l2norm=case.l2norm, form=_form(case))
    pool, cls = r.pool, r.row_class.clone()
    if not pooled:
        pool = r.final_state.clone()
        cls = torch.full((case.N,), 1, dtype=torch.int8, device=st.device)
        for n, L in enumerate(case.seqlens):
            if L == 0:  # SM90 writes nothing for a zero-length sequence: its row keeps the poison
                pool[n] = float("nan")
                cls[n] = ROW_UNDEFINED
    if not ofs:
        # final-state rows: SM90 stores into any output_state it has (not part of the contract), but
        # with output_state absent it must use scratch and leave the caller's pool as it was (finding 5)
        rows = (case.write_indices or case.read_indices) if pooled else list(range(case.N))
        for n, w in enumerate(rows):
            if w < 0 or cls[w] == ROW_WRITTEN and ck_rows is not None and w in ck_rows:
                continue
            if pooled and ostate == "absent":
                pool[w], cls[w] = st[w], ROW_UNTOUCHED
            else:
                cls[w] = ROW_UNDEFINED
    T = inputs.q.shape[1]
    return PoolResult(o=r.o, o_class=torch.full((1, T), OUT_ORACLE, dtype=torch.int8, device=r.o.device),
                      pool=pool, row_class=cls)


def _form(case: Case) -> str:
    return "recurrent" if max(case.seqlens or [0]) <= 16 else "chunked"


def expected_paged(inputs: Inputs, gates64) -> PoolResult:
    """The oracle of a paged call (``chunk_gated_delta_rule_paged`` / ``gated_delta_rule_decode_paged``);
    ``gates64(inputs) -> (g, beta)`` float64: the gates the oracle uses for a decode call."""
    from gdncheck_reference import paged_decode, paged_prefill
    case = inputs.case
    pt = page_table(case)
    if case.op == "decode":
        g, beta = gates64(inputs)
        return paged_decode(inputs.q, inputs.k, inputs.v, g, beta, pool=inputs.state, page_indices=pt.page_indices,
                            page_indptr=pt.page_indptr, last_page_len=pt.last_page_len, layout=case.layout,
                            scale=case.scale, use_qk_l2norm=case.l2norm)
    g, beta, _ = prefill_gates(inputs)
    g64, b64 = oracle_gates(inputs, g, beta)
    return paged_prefill(inputs.q, inputs.k, inputs.v, g64, b64, cu_seqlens=inputs.cu_seqlens.cpu(), pool=inputs.state,
                         page_indices=pt.page_indices, page_indptr=pt.page_indptr, page_size=pt.page_size,
                         last_page_len=pt.last_page_len, layout=case.layout, scale=case.scale,
                         use_qk_l2norm=case.l2norm, form=_form(case))
