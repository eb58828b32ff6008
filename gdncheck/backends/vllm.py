"""vLLM 0.33.0's own GDN kernels (``vllm/third_party/flash_linear_attention/ops``), called as
``model_executor/layers/mamba/gdn/qwen_gdn_linear_attn.py`` calls them. States are K-last:
pool ``[P, HV, V, K]``. vLLM's ``NULL_BLOCK_ID = 0``: an index ``<= 0`` is its null block, so a
case whose live slot is 0 cannot be expressed and is unsupported here.

- :class:`VLLMPackedDecode` (``vllm-decode``): ``fused_recurrent_gated_delta_rule_packed_decode``
  (``_forward_core_decode_non_spec``): ``mixed_qkv [B, 2*H*K + HV*V]`` (the conv output), raw
  ``a, b [B, HV]``, ``ssm_state_indices [B]`` in place, output written into the caller's
  ``core_attn_out`` view ``[B, 1, HV, V]``. Rounding: g, exp(g), beta fp32 (beta **not** rounded);
  L2 norm ``x / sqrt(sum + 1e-6)``. Index <= 0: output zero, no read, no write -> ``skip``.
- :class:`VLLMFusedSigmoid` (``vllm-fused-sigmoid``): ``fused_sigmoid_gating_delta_rule_update``
  with ``inplace_final_state=True``, tokens packed ``[1, B*T, ...]`` with ``cu_seqlens``.
  Decode: 1-D ``ssm_state_indices [B]``. Spec verify: 2-D ``ssm_state_indices [B, T]`` and
  ``num_accepted_tokens [B]``: the initial state is read at column ``num_accepted - 1`` and the
  state after token t is written to slot ``idx[n, t]`` when > 0. The adapter sets
  ``num_accepted = T`` (every draft of the previous step accepted) so that the read slot is
  column T - 1, which also receives the final state; the per-token states go to ``B*(T-1)``
  scratch slots appended to the pool when the case asks for them, else to the null block 0
  (vLLM skips those writes). Rounding: beta fp32; L2 norm ``x * rsqrt(sum + 1e-6)``. Index <= 0:
  the row returns before writing anything (output rows stay as allocated, pool untouched);
  declared ``null_slot`` (output undefined, slot 0 unchecked), the nearest weaker contract;
  ``tests/test_engines.py`` checks the pool stays untouched, slot 0 included.
- :class:`VLLMChunk` (``vllm-chunk``, CUDA): ``fused_post_conv_prep`` (split, L2 norm, g and beta
  in fp32, beta not rounded) then ``chunk_gated_delta_rule(..., use_qk_l2norm_in_kernel=False,
  chunk_indices, chunk_offsets)`` on ``initial_state = ssm_state[idx]`` (rows without history
  zeroed; here every row has one), then ``ssm_state[idx] = final_state.to(pool dtype)``.

``*-interp`` variants run on the CPU under ``TRITON_INTERPRET=1`` (K, V <= 64). Twin: ``twin-fla``.
"""
from __future__ import annotations

import torch

from gdncheck.backends.base import Capabilities, Outputs
from gdncheck.backends.engines import EngineBackend, interp_variant
from gdncheck.data.case import Case
from gdncheck.inputs import Inputs

_FR = "fused_recurrent"
_FS = "fused_sigmoid_gating"
_PREP = "fused_gdn_prefill_post_conv"
_CHUNK = "chunk"
_INDEX = "index"


def _vllm_pool(inputs: Inputs, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
    """``(pool the kernel sees, read indices [N] int32, adapter work, first scratch slot)``.

    A plain state is placed in slots 1..N after the null block 0; ``extra`` scratch slots are
    appended (NaN) after the case's pool. The caller copies rows back with :func:`_unpool`.
    """
    c = inputs.case
    dev = inputs.state.device
    if c.pool_size is None:
        base = inputs.state
        P = c.N + 1
        idx = torch.arange(1, c.N + 1, dtype=torch.int32, device=dev)
        work = ["plain state placed in slots 1..N after vLLM's null block 0"]
        off = 1
    else:
        base = inputs.state
        P = c.pool_size
        idx = inputs.read_indices
        work = []
        off = 0
    if c.pool_size is not None and extra == 0:
        return base, idx, work, P
    ext = torch.full((P + extra, *base.shape[1:]), float("nan"), dtype=base.dtype, device=dev)
    ext[off:off + base.shape[0]] = base
    if extra:
        work.append(f"pool extended by {extra} scratch slots for the per-token states")
    return ext, idx, work, P


def _unpool(inputs: Inputs, pool: torch.Tensor) -> torch.Tensor:
    c = inputs.case
    if pool is inputs.state:
        return pool
    off = 1 if c.pool_size is None else 0
    inputs.state.copy_(pool[off:off + inputs.state.shape[0]])
    return inputs.state


def _vllm_slots(be, case: Case) -> str | None:
    if case.write_indices is not None and case.write_indices != case.read_indices:
        return f"{be.name}: one index tensor reads and writes (write_indices must equal read_indices)"
    if case.read_indices is not None and 0 in case.read_indices:
        return f"{be.name}: slot 0 is vLLM's null block (index <= 0 is never read or written)"
    return None


_CAPS = Capabilities(
    ops={"decode", "verify"}, dtypes={"bfloat16", "float16", "float32"}, state_dtypes={"float32", "bfloat16"},
    layouts={"k_last"}, gva=True, gqa=False, varlen=False, pool=True, strided_pool=True,
    strided_gates=True, gate_sources={"raw"}, l2norm={True, False}, intermediate=True,
    disable_state_update=False, custom_scale=True, padding={"null_slot"}, device="cuda",
)


class _VLLMBase(EngineBackend):
    family = "vllm"
    pkg = "vllm"
    twin = "twin-fla"

    def supports(self, case: Case) -> str | None:
        return super().supports(case) or _vllm_slots(self, case)


class VLLMPackedDecode(_VLLMBase):
    """``fused_recurrent_gated_delta_rule_packed_decode``: vLLM's non-spec decode (T = 1)."""

    name = "vllm-decode"
    modules = (_FR,)
    caps = _CAPS.model_copy(update={"ops": {"decode"}, "intermediate": False, "padding": {"skip"},
                                    "l2norm": {True}})
    padding_policy = {"decode": "skip"}
    beta_rounded = False

    def run(self, inputs: Inputs) -> Outputs:
        c = inputs.case
        B, H, HV, K, V = c.B, c.H, c.HS, c.K, c.V
        pool, idx, work, _ = _vllm_pool(inputs)
        mixed = self.packed_qkv(inputs)
        work.append("q, k, v packed into mixed_qkv [B, 2*H*K + HV*V] (vLLM's conv output)")
        self.mod(_FR).fused_recurrent_gated_delta_rule_packed_decode(
            mixed_qkv=mixed, a=inputs.a.reshape(B, HV), b=inputs.b.reshape(B, HV), A_log=inputs.A_log,
            dt_bias=inputs.dt_bias, scale=c.scale if c.scale is not None else K ** -0.5,
            initial_state=pool, out=inputs.out, ssm_state_indices=idx, use_qk_l2norm_in_kernel=True)
        return Outputs(o=inputs.out, state=_unpool(inputs, pool), adapter_work=work,
                       path="vllm.packed_decode")


class VLLMFusedSigmoid(_VLLMBase):
    """``fused_sigmoid_gating_delta_rule_update``: decode (1-D indices) and spec verify (2-D)."""

    name = "vllm-fused-sigmoid"
    modules = (_FS,)
    caps = _CAPS
    padding_policy = {"decode": "null_slot", "verify": "null_slot"}
    beta_rounded = False

    def run(self, inputs: Inputs) -> Outputs:
        c = inputs.case
        B, T, HV = c.B, c.T, c.HS
        scratch = B * (T - 1) if (c.op == "verify" and c.intermediate) else 0
        pool, idx, work, first = _vllm_pool(inputs, scratch)
        dev = pool.device
        flat = lambda t: t.reshape(1, B * T, *t.shape[2:])  # noqa: E731
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=dev)
        kw = dict(A_log=inputs.A_log, a=inputs.a.reshape(B * T, HV), b=inputs.b.reshape(B * T, HV),
                  dt_bias=inputs.dt_bias, q=flat(inputs.q), k=flat(inputs.k), v=flat(inputs.v),
                  initial_state=pool, inplace_final_state=True, cu_seqlens=cu,
                  use_qk_l2norm_in_kernel=c.l2norm, scale=c.scale)
        fn = self.mod(_FS).fused_sigmoid_gating_delta_rule_update
        inter = None
        if c.op == "decode":
            o, _ = fn(**kw, ssm_state_indices=idx)
            path = "vllm.fused_sigmoid.decode"
        else:
            spec = torch.zeros((B, T), dtype=torch.int32, device=dev)  # 0: null block, write skipped
            if scratch:
                spec[:, : T - 1] = first + torch.arange(B * (T - 1), dtype=torch.int32, device=dev).view(B, T - 1)
            spec[:, T - 1] = idx
            padded = idx <= 0
            spec[padded] = idx[padded, None]  # a padded row: every column padded, as vLLM pads it
            acc = torch.full((B,), T, dtype=torch.int32, device=dev)
            work.append("num_accepted_tokens = T: the read slot is column T - 1, which receives the final state")
            o, _ = fn(**kw, ssm_state_indices=spec, num_accepted_tokens=acc)
            path = "vllm.fused_sigmoid.spec_verify"
            if scratch:
                inter = inputs.intermediate
                inter[:, : T - 1] = pool[spec[:, : T - 1].long().clamp(min=0)].to(inter.dtype)
                live = ~padded
                inter[live, T - 1] = pool[idx[live].long()].to(inter.dtype)
                work.append("intermediate states gathered from the scratch slots and the final slot")
        inputs.out.copy_(o.reshape(inputs.out.shape))
        work.append("output copied into the caller's buffer (the kernel allocates its own)")
        return Outputs(o=inputs.out, state=_unpool(inputs, pool), intermediate=inter,
                       adapter_work=work, path=path)


class VLLMChunk(_VLLMBase):
    """``fused_post_conv_prep`` then ``chunk_gated_delta_rule`` (prefill; gather/scatter by vLLM)."""

    name = "vllm-chunk"
    modules = (_PREP, _CHUNK, _INDEX)
    caps = Capabilities(empty_batch=False, 
        ops={"prefill"}, dtypes={"bfloat16", "float16"}, state_dtypes={"float32", "bfloat16"},
        layouts={"k_last"}, gva=True, gqa=False, varlen=True, pool=True, strided_pool=True,
        strided_gates=False, gate_sources={"raw"}, l2norm={True, False}, intermediate=False,
        disable_state_update=False, custom_scale=False, padding=set(), device="cuda")
    padding_policy = {}
    zero_length_policy = "passthrough"
    beta_rounded = False
    compile_hint_s = 40.0


    def compile_key(self, case: Case) -> tuple:
        return (self.name, case.H, case.HV, case.K, case.V, case.dtype, case.state_dtype, case.l2norm)

    def run(self, inputs: Inputs) -> Outputs:
        c = inputs.case
        T, H, HV, K, V = c.T, c.H, c.HS, c.K, c.V
        pool, idx, work, _ = _vllm_pool(inputs)
        mixed = self.packed_qkv(inputs)
        work.append("q, k, v packed into the conv output [T, 2*H*K + HV*V]")
        q, k, v, g, beta = self.mod(_PREP).fused_post_conv_prep(
            conv_output=mixed, a=inputs.a.reshape(T, HV), b=inputs.b.reshape(T, HV), A_log=inputs.A_log,
            dt_bias=inputs.dt_bias, num_k_heads=H, head_k_dim=K, head_v_dim=V, apply_l2norm=c.l2norm,
            output_g_exp=False)
        cu = inputs.cu_seqlens
        index = self.mod(_INDEX)
        chunk_indices = index.prepare_chunk_indices(cu.cpu(), 64).to(cu.device)
        chunk_offsets = index.prepare_chunk_offsets(cu.cpu(), 64).to(cu.device)
        init = pool[idx.long()]  # vLLM gathers; every row of a case has history
        o, final = self.mod(_CHUNK).chunk_gated_delta_rule(
            q=q.unsqueeze(0), k=k.unsqueeze(0), v=v.unsqueeze(0), g=g.unsqueeze(0), beta=beta.unsqueeze(0),
            initial_state=init, output_final_state=True, cu_seqlens=cu, chunk_indices=chunk_indices,
            chunk_offsets=chunk_offsets, use_qk_l2norm_in_kernel=False)
        pool[idx.long()] = final.to(pool.dtype)
        inputs.out.copy_(o.reshape(inputs.out.shape))
        work.append("output copied into the caller's buffer")
        return Outputs(o=inputs.out, state=_unpool(inputs, pool), adapter_work=work, path="vllm.chunk")


VLLMPackedDecodeInterp = interp_variant(VLLMPackedDecode)
VLLMFusedSigmoidInterp = interp_variant(VLLMFusedSigmoid)
VLLMChunkInterp = interp_variant(
    VLLMChunk, ", with the chunk fixes of :func:`gdncheck.backends.engines.interpreter_fixes` (bf16 dots, "
    "first autotune config, the loop variable of ``chunk_delta_h`` as a tensor)")
