"""What the oracle expects of a backend's call: the bridge from a case to ``gdncheck_reference``.

Uses the exact tensors the kernel received (rounded inputs, fp32 precomputed gates or the raw
gates), so that every difference left belongs to the kernel.
"""
from __future__ import annotations

import torch

from gdncheck.inputs import Inputs
from gdncheck_reference import PoolResult, compute_gates, pooled_gated_delta_rule


def gates64(inputs: Inputs, *, beta_dtype=None, exp_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, beta)`` float64 ``[B, T, HS]`` as the oracle uses them for this case.

    ``gate_source = "precomputed"``: the fp32 g and beta the kernel got. ``"raw"``: computed
    in float64 from the raw inputs. ``beta_dtype`` / ``exp_dtype``: ablation hooks.
    """
    c = inputs.case
    if c.gate_source == "precomputed" and beta_dtype is None and exp_dtype is None:
        return inputs.g.double(), inputs.beta.double()
    g, _, beta = compute_gates(inputs.A_log, inputs.a, inputs.dt_bias, inputs.b,
                               beta_dtype=beta_dtype, exp_dtype=exp_dtype)
    return g, beta

def expected(inputs: Inputs, policy: str = "skip", zero_length: str = "passthrough", *,
             device: str | torch.device | None = None, form: str | None = None,
             beta_dtype=None, exp_dtype=None) -> PoolResult:
    """The oracle's :class:`PoolResult` for ``inputs`` under a padding/zero-length policy.

    ``form`` None picks the recurrent form for short sequences, the chunked one otherwise.
    Plain-state cases (no pool) are a pool of N rows read and written in order, so every
    result has the same form: ``pool`` is the expected final state ``[N, HS, ...]`` then.
    """
    c = inputs.case
    if c.call and c.op == "prefill" and "page_size" not in c.call:  # chunk_gated_delta_rule with its arguments
        from gdncheck.api_calls import expected_prefill_call
        return expected_prefill_call(inputs.clone(device) if device is not None else inputs)
    if c.call.get("page_size"):  # paged pools: rows from the page table
        from gdncheck.api_calls import expected_paged
        return expected_paged(inputs.clone(device) if device is not None else inputs, gates64)
    if form is None:  # a few tokens per sequence: the token loop beats padding a 64-token chunk
        form = "recurrent" if max(c.seqlens) <= 16 else "chunked"
    dev = torch.device(device) if device is not None else inputs.q.device
    g, beta = gates64(inputs, beta_dtype=beta_dtype, exp_dtype=exp_dtype)
    if c.pool_size is None:
        read = torch.arange(c.N, dtype=torch.int32)
        write = None
    else:
        read, write = inputs.read_indices, inputs.write_indices
    mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
    return pooled_gated_delta_rule(
        mv(inputs.q), mv(inputs.k), mv(inputs.v), mv(g), mv(beta),
        pool=mv(inputs.state), read_indices=read.cpu(), write_indices=None if write is None else write.cpu(),
        policy=policy, zero_length=zero_length, disable_state_update=c.disable_state_update,
        cu_seqlens=None if inputs.cu_seqlens is None else inputs.cu_seqlens.cpu(), layout=c.layout,
        scale=c.scale, use_qk_l2norm=c.l2norm, output_init=mv(inputs.out).double(),
        output_intermediate=c.intermediate, form=form)
