"""The argument adapter end to end on the CPU: ``flashinfer.gdn_prefill`` replaced by a float64 fake that
interprets the arguments it is handed (alpha / log / raw gates, logit beta, rows, checkpoints) and
writes its tensors in place. The run then judges the adapter's outputs with the argument oracle: a
faithful fake passes every legal api case, a fake that writes the row of a write index -1, or
that ignores checkpoint_state_indices, fails on a contract. The fake knows nothing of the oracle's
page or checkpoint bookkeeping beyond what FlashInfer's docstring says.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from gdncheck.backends.flashinfer_api import FlashInferPrefillArgs
from gdncheck.suites import load_suite
from gdncheck.budgets import load_budgets
from gdncheck.judge import judge_result as judge
from gdncheck.execute import run_case
from gdncheck_reference import gated_delta_rule, l2norm

F64 = torch.float64


def fake_chunk(q, k, v, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
               use_qk_l2norm_in_kernel=False, output=None, output_state=None, state_checkpoints=None,
               checkpoint_cu_starts=None, checkpoint_every_n_tokens=0, use_cp="auto", state_indices=None,
               backend="auto", max_seqlen=None, *, gate_domain="linear", use_gate_in_kernel=False, A_log=None,
               dt_bias=None, beta_is_logit=False, cu_seqlens_cpu=None, output_state_indices=None,
               checkpoint_state_indices=None, prefix_lens=None, bug=None):
    if output_state_indices is not None and (output_state is None or not output_final_state):
        raise ValueError("output_state_indices requires an explicit output_state pool and output_final_state=True")
    if use_gate_in_kernel:
        lg = -torch.exp(A_log.double()) * torch.nn.functional.softplus(g.double() + dt_bias.double())
    elif gate_domain == "log":
        lg = g.double()
    else:
        lg = torch.log(g.double())
    lg = torch.log(torch.exp(lg) + 1e-10)
    b = torch.sigmoid(beta.float()).to(beta.dtype).double() if beta_is_logit else beta.double()
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q).to(q.dtype), l2norm(k).to(k.dtype)
    cu = cu_seqlens.tolist()
    N = len(cu) - 1
    if output_state is None:  # SM90 allocates fp32 scratch: [N, ...], or pool-shaped with state_indices
        shape = initial_state.shape if state_indices is not None and initial_state is not None else \
            (N, output.shape[1], v.shape[-1], q.shape[-1])
        output_state = torch.full(shape, float("nan"), dtype=torch.float32)
    reads = state_indices.tolist() if state_indices is not None else list(range(N))
    writes = output_state_indices.tolist() if output_state_indices is not None else reads
    pre = prefix_lens.tolist() if prefix_lens is not None else [0] * N
    every = checkpoint_every_n_tokens
    for n in range(N):
        s, e = cu[n], cu[n + 1]
        S = torch.zeros(1, *output.shape[1:2], v.shape[-1], q.shape[-1], dtype=F64)
        if initial_state is not None and reads[n] >= 0:
            S = initial_state[reads[n]][None].double()
        j = 0
        for t in range(s, e):
            r = gated_delta_rule(q[None, t:t + 1], k[None, t:t + 1], v[None, t:t + 1], lg[None, t:t + 1],
                                 b[None, t:t + 1], scale=scale, initial_state=S, layout="k_last", form="recurrent")
            output[t] = r.o[0, 0].to(output.dtype)
            S = r.final_state
            if every and (pre[n] + t - s + 1) % every == 0:
                e_ = int(checkpoint_cu_starts[n]) + j
                row = int(checkpoint_state_indices[e_]) if checkpoint_state_indices is not None and bug != "ckpt" else e_
                if row >= 0:
                    state_checkpoints[row] = S[0].to(state_checkpoints.dtype)
                j += 1
        w = writes[n] if bug != "minus_one" or writes[n] >= 0 else 0
        if output_state is not None and e > s and w >= 0:
            output_state[w] = S[0].to(output_state.dtype)
    return (output, output_state) if output_final_state else output


@pytest.fixture
def fake(monkeypatch):
    mod = types.ModuleType("flashinfer.gdn_prefill")
    mod.chunk_gated_delta_rule = fake_chunk
    pkg = types.ModuleType("flashinfer")
    pkg.gdn_prefill = mod
    monkeypatch.setitem(sys.modules, "flashinfer", pkg)
    monkeypatch.setitem(sys.modules, "flashinfer.gdn_prefill", mod)
    return mod


def _backend():
    import inspect
    b = FlashInferPrefillArgs(params=set(inspect.signature(fake_chunk).parameters))
    b.available = lambda: None
    b._pre_params = lambda: set(inspect.signature(fake_chunk).parameters)
    return b


def test_faithful_fake_passes_legal_api_cases(fake):
    b, budgets = _backend(), load_budgets()
    cases = [c for c in load_suite("api") if c.tags[0] == "api:chunk_gated_delta_rule"][:6]
    ran = 0
    for c in cases:
        if b.supports(c) is not None or b.invalid_for(c) is not None:
            continue
        r = run_case(b, c, device="cpu")
        assert r.status == "ok", (c.name, r.reason)
        fails = [f for f in judge(r, budgets) if f.kind == "contract"]
        assert not fails, (c.name, [(f.check, f.detail) for f in fails])
        ran += 1
    assert ran >= 3


@pytest.mark.parametrize("bug,what", [("minus_one", "contract:untouched_rows"), ("ckpt", "contract:")])
def test_planted_bugs_fail(fake, bug, what, monkeypatch):
    b, budgets = _backend(), load_budgets()
    want = {"minus_one": lambda c: c.write_indices and any(w < 0 and L for w, L in zip(c.write_indices, c.seqlens))
            and "output_final_state" not in c.call,
            "ckpt": lambda c: c.call.get("checkpoint_state_indices") in ("present", "minus_one")}[bug]
    c = next(c for c in load_suite("api") if c.tags[0] == "api:chunk_gated_delta_rule" and want(c)
             and b.supports(c) is None and b.invalid_for(c) is None)
    monkeypatch.setattr(fake, "chunk_gated_delta_rule", lambda *a, **kw: fake_chunk(*a, **kw, bug=bug))
    r = run_case(b, c, device="cpu")
    checks = [f.check for f in judge(r, budgets)]
    assert any(x.startswith(what) for x in checks) or r.status != "ok", (c.name, checks)


def fake_paged(q, k, v, g=None, beta=None, scale=None, *, cu_seqlens, state_pool, page_indices, page_indptr, page_size,
               last_page_len, use_qk_l2norm_in_kernel=False, output=None, slots=None, **gates):
    """FlashInfer 0.7.4's chunk_gated_delta_rule_paged body: rows from the page table, then one
    chunk_gated_delta_rule call (here the fake) with separate rows, page checkpoints and prefix_lens."""
    from gdncheck_reference import paged_prefill_slots
    s = paged_prefill_slots(cu_seqlens.cpu(), page_indices.cpu(), page_indptr.cpu(), page_size, last_page_len.cpu())
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    fake_chunk(q, k, v, g, beta, scale, initial_state=state_pool, output_final_state=True, cu_seqlens=cu_seqlens,
               use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, output=output, output_state=state_pool,
               state_checkpoints=state_pool, checkpoint_cu_starts=t(s.checkpoint_cu_starts),
               checkpoint_every_n_tokens=page_size, use_cp=False, state_indices=t(s.state_indices),
               output_state_indices=t(s.output_state_indices), checkpoint_state_indices=page_indices,
               prefix_lens=t(s.prefix_lens), **gates)
    return output


def test_paged_prefill_adapter_end_to_end(monkeypatch):
    import inspect

    from gdncheck.backends.flashinfer_api import FlashInferPrefillPaged
    mod = types.ModuleType("flashinfer.gdn_paged")
    mod.chunk_gated_delta_rule_paged = fake_paged
    mod.gdn_paged_prefill_slots = None  # imported by the adapter; slots=precomputed cases are skipped here
    pkg = types.ModuleType("flashinfer")
    pkg.gdn_paged = mod
    monkeypatch.setitem(sys.modules, "flashinfer", pkg)
    monkeypatch.setitem(sys.modules, "flashinfer.gdn_paged", mod)
    from gdncheck.backends.api_spec import SIGNATURES, V074
    b = FlashInferPrefillPaged(params=SIGNATURES[V074]["chunk_gated_delta_rule_paged"])
    b._pre_params = lambda: SIGNATURES[V074]["chunk_gated_delta_rule"]
    b.available = lambda: None
    budgets = load_budgets()
    ran = 0
    for c in load_suite("api"):
        if c.tags[0] != "api:chunk_gated_delta_rule_paged" or c.call.get("slots") == "precomputed":
            continue
        if b.supports(c) is not None or b.invalid_for(c) is not None:
            continue
        r = run_case(b, c, device="cpu")
        assert r.status == "ok", (c.name, r.reason)
        fails = [f for f in judge(r, budgets) if f.kind == "contract"]
        assert not fails, (c.name, [(f.check, f.detail) for f in fails])
        ran += 1
        if ran == 4:
            break
    assert ran == 4
