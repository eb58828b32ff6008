"""The engines' FlashInfer call patterns on SM90 (CUDA only), where engine-side bugs live.

Each adapter does around FlashInfer exactly what the engine does (SGLang 0.5.23
``srt/layers/attention/linear/kernels/gdn_flashinfer.py`` with ``use_state_pool = False`` on
SM90; vLLM 0.33.0 ``qwen_gdn_linear_attn.py`` ``fi_chunk_gated_delta_rule`` and ``_forward_core``);
the engine's own helpers it calls first (``fused_gdn_gating``, ``gdn_prefill_qkv_prepare_fwd``,
``fused_post_conv_prep``) are the engine's kernels, loaded by :mod:`gdncheck.backends.engines`.
States are K-last pools ``[P, HV, V, K]``, K = V = 128, fp32.

- ``sglang-flashinfer-decode``: ``state = pool[idx]`` (a gathered copy), ``gated_delta_rule_decode_pretranspose(
  state=..., use_qk_l2norm=True, scale=None)`` (fp32 T = 1 kernel), then ``pool[idx] = new_state``.
  Rounding: the kernel's (gates in kernel, fp32, beta not rounded).
- ``sglang-flashinfer-extend``: ``g, beta = fused_gdn_gating(...)`` (beta rounded to bf16),
  ``q, k = l2norm`` in SGLang's Triton prepare kernel (stored bf16), ``alpha = exp(g.float())``,
  ``initial_state = pool[where(idx >= 0, idx, P - 1)].float()``, ``chunk_gated_delta_rule(...,
  use_qk_l2norm_in_kernel=False, output_state=empty)``, then ``pool.index_copy_(0, idx', final)``.
- ``sglang-flashinfer-verify``: ``gated_delta_rule_mtp(initial_state=pool, initial_state_indices=idx,
  intermediate_states_buffer=buffer, disable_state_update=True, use_qk_l2norm=True, scale=None)``;
  SGLang then scatters the accepted step (the adapter: the last one, all T accepted).
- ``vllm-flashinfer-prefill``: ``fused_post_conv_prep`` (L2 norm, g, beta fp32, q/k stored in the
  input dtype), ``initial_state = ssm_state[idx]`` (rows without history zeroed: none here),
  ``chunk_gated_delta_rule(q, k, v, g=exp(g), beta, initial_state.float(), cu_seqlens int64,
  use_cp="auto")``, then ``ssm_state[idx] = final.to(pool dtype)``.

Padding: SGLang gathers with torch indexing, so -1 on its decode reads and writes the pool's
*last* slot, and its extend remaps -1 to the last slot explicitly; SGLang's pool keeps that slot
spare. No gdncheck policy names a last-slot null slot, so padded cases are unsupported here with
that reason (the same call on a pool whose last slot is live corrupts it). The verify path pads
like ``gated_delta_rule_mtp`` (no read, no write; the output rows of the kernel's own buffer
stay unset): declared ``null_slot``, the nearest weaker contract.
Twin: ``twin-flashinfer``.
"""
from __future__ import annotations

import torch

from gdncheck.backends.base import Capabilities, Outputs
from gdncheck.backends.engines import EngineBackend, engine_version
from gdncheck.backends.flashinfer import _fi_available, _fi_version
from gdncheck.data.case import Case
from gdncheck.inputs import Inputs

_CAPS = Capabilities(
    ops={"decode"}, dtypes={"bfloat16"}, state_dtypes={"float32"}, layouts={"k_last"}, K={128}, V={128},
    gva=True, gqa=False, varlen=False, pool=True, strided_pool=True, strided_gates=True, gate_sources={"raw"},
    l2norm={True}, intermediate=False, disable_state_update=False, custom_scale=False, padding=set(),
    device="cuda")


class _EngineFlashInfer(EngineBackend):
    twin = "twin-flashinfer"
    fi_module = "flashinfer.gdn_decode"
    compile_hint_s = 10.0

    def version(self) -> str:
        return f"{self.pkg} {engine_version(self.pkg)} / flashinfer {_fi_version()}"

    def available(self) -> str | None:
        why = _fi_available(self.fi_module)
        if why:
            return why
        return super().available() if self.modules else None

    pad_reason = ("-1 gathers and scatters the pool's last slot (torch indexing; SGLang keeps it "
                  "spare), a null slot no gdncheck policy names")

    def supports(self, case: Case) -> str | None:
        if case.padded_rows and not self.caps.padding:
            return f"{self.name}: {self.pad_reason}"
        why = super().supports(case)
        if why:
            return why
        if case.write_indices is not None and case.write_indices != case.read_indices:
            return f"{self.name}: one index tensor reads and writes (write_indices must equal read_indices)"
        return None

    @staticmethod
    def _pool(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        c = inputs.case
        if c.pool_size is None:
            return inputs.state, torch.arange(c.N, dtype=torch.int32, device=inputs.state.device)
        return inputs.state, inputs.read_indices


class SGLangFlashInferDecode(_EngineFlashInfer):
    """SGLang's FlashInfer decode on SM90: gather, fp32 T = 1 kernel, scatter."""

    name = "sglang-flashinfer-decode"
    family = "sglang"
    pkg = "sglang"
    modules = ()
    caps = _CAPS
    padding_policy = {}

    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.gdn_decode import gated_delta_rule_decode_pretranspose

        c = inputs.case
        pool, idx = self._pool(inputs)
        B, HV, V = c.B, c.HS, c.V
        state_batch = pool[idx.long()]
        o, new_state = gated_delta_rule_decode_pretranspose(
            q=inputs.q.view(B, 1, c.H, c.K), k=inputs.k.view(B, 1, c.H, c.K), v=inputs.v.view(B, 1, HV, V),
            state=state_batch, A_log=inputs.A_log, a=inputs.a.reshape(B, 1, HV), dt_bias=inputs.dt_bias,
            b=inputs.b.reshape(B, 1, HV), scale=None, output=None, use_qk_l2norm=True)
        pool[idx.long()] = new_state
        inputs.out.copy_(o.reshape(inputs.out.shape))
        return Outputs(o=inputs.out, state=pool, path="sglang.flashinfer.decode.fp32_t1",
                       adapter_work=["SGLang's gather of pool[idx] and scatter of the new state",
                                     "output copied into the caller's buffer"])


class SGLangFlashInferExtend(_EngineFlashInfer):
    """SGLang's FlashInfer extend on SM90: ``fused_gdn_gating``, Triton L2 norm, gathered fp32 state."""

    name = "sglang-flashinfer-extend"
    family = "sglang"
    pkg = "sglang"
    modules = ("linear.fused_gdn_gating", "fla.l2norm")
    fi_module = "flashinfer.gdn_prefill"
    twin = "twin-fla-beta-bf16"
    caps = _CAPS.model_copy(update={"empty_batch": False, "ops": {"prefill"}, "varlen": True})
    padding_policy = {}
    zero_length_policy = "untouched"
    compile_hint_s = 20.0


    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.gdn_prefill import chunk_gated_delta_rule

        c = inputs.case
        T, HV = c.T, c.HS
        pool, idx = self._pool(inputs)
        g, beta = self.mod("linear.fused_gdn_gating").fused_gdn_gating(
            inputs.A_log, inputs.a.reshape(T, HV), inputs.b.reshape(T, HV), inputs.dt_bias)
        q, k, v = self.mod("fla.l2norm").gdn_prefill_qkv_prepare_fwd(inputs.q[0], inputs.k[0], inputs.v[0])
        alpha = torch.exp(g[0].to(torch.float32))
        beta = beta[0].to(torch.float32)
        rows = torch.where(idx >= 0, idx, pool.shape[0] - 1).to(torch.int64)
        h0 = pool[rows].to(torch.float32)
        out_state = torch.empty_like(h0)
        o, out_state = chunk_gated_delta_rule(
            q=q, k=k, v=v, g=alpha, beta=beta, scale=None, initial_state=h0, output_final_state=True,
            cu_seqlens=inputs.cu_seqlens.to(torch.int64), use_qk_l2norm_in_kernel=False,
            output=inputs.out[0], output_state=out_state)
        pool.index_copy_(0, rows, out_state.to(pool.dtype))
        return Outputs(o=inputs.out, state=pool, path="sglang.flashinfer.extend",
                       adapter_work=["SGLang's gather of pool[idx] (fp32) and index_copy_ of the final states"])


class SGLangFlashInferVerify(_EngineFlashInfer):
    """SGLang's FlashInfer target verify: ``gated_delta_rule_mtp`` with ``disable_state_update=True``."""

    name = "sglang-flashinfer-verify"
    family = "sglang"
    pkg = "sglang"
    modules = ()
    caps = _CAPS.model_copy(update={"ops": {"verify"}, "intermediate": True, "disable_state_update": True,
                                    "padding": {"null_slot"}})
    padding_policy = {"verify": "null_slot"}  # the kernel skips padded rows; its own output rows stay unset

    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.gdn_decode import gated_delta_rule_mtp

        c = inputs.case
        B, T = c.B, c.T
        pool, idx = self._pool(inputs)
        buf = torch.full((B + 1, T, *pool.shape[1:]), float("nan"), dtype=pool.dtype, device=pool.device)
        o, _ = gated_delta_rule_mtp(
            q=inputs.q, k=inputs.k, v=inputs.v, initial_state=pool, initial_state_indices=idx,
            A_log=inputs.A_log, a=inputs.a, dt_bias=inputs.dt_bias, b=inputs.b, scale=None, output=None,
            intermediate_states_buffer=buf, disable_state_update=True, use_qk_l2norm=True)
        work = ["output copied into the caller's buffer (the kernel allocates its own)"]
        inputs.out.copy_(o.view(inputs.out.shape))
        live = [n for n, r in enumerate(idx.tolist()) if r >= 0]
        sel = torch.tensor(live, dtype=torch.long, device=pool.device)
        inter = None
        if c.intermediate:
            inputs.intermediate.copy_(buf[:B])
            inter = inputs.intermediate
        if not c.disable_state_update and live:
            pool[idx[sel].long()] = buf[sel, T - 1]
            work.append("accepted step scattered from the intermediate buffer (SGLang's post-verify update, "
                        "all T accepted)")
        return Outputs(o=inputs.out, state=pool, intermediate=inter, adapter_work=work,
                       path="sglang.flashinfer.verify.mtp")


class VLLMFlashInferPrefill(_EngineFlashInfer):
    """vLLM's FlashInfer prefill: ``fused_post_conv_prep``, gathered state, ``fi_chunk_gated_delta_rule``."""

    name = "vllm-flashinfer-prefill"
    family = "vllm"
    pkg = "vllm"
    modules = ("fused_gdn_prefill_post_conv",)
    fi_module = "flashinfer.gdn_prefill"
    pad_reason = "vLLM's prefill batch has no padded rows (index <= 0 is its null block)"
    caps = _CAPS.model_copy(update={"empty_batch": False, "ops": {"prefill"}, "varlen": True, "strided_gates": False,
                                    "l2norm": {True, False}, "state_dtypes": {"float32", "bfloat16"}})
    padding_policy = {}
    zero_length_policy = "untouched"
    compile_hint_s = 20.0

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        if case.read_indices is not None and 0 in case.read_indices:
            return f"{self.name}: slot 0 is vLLM's null block"
        return None

    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.gdn_prefill import chunk_gated_delta_rule

        c = inputs.case
        T, H, HV, K, V = c.T, c.H, c.HS, c.K, c.V
        pool, idx = self._pool(inputs)
        mixed = self.packed_qkv(inputs)
        q, k, v, g, beta = self.mod("fused_gdn_prefill_post_conv").fused_post_conv_prep(
            conv_output=mixed, a=inputs.a.reshape(T, HV), b=inputs.b.reshape(T, HV), A_log=inputs.A_log,
            dt_bias=inputs.dt_bias, num_k_heads=H, head_k_dim=K, head_v_dim=V, apply_l2norm=c.l2norm,
            output_g_exp=False)
        h0 = pool[idx.long()].to(torch.float32)
        o, final = chunk_gated_delta_rule(
            q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), g=torch.exp(g.float()), beta=beta.float(),
            initial_state=h0, output_final_state=True, cu_seqlens=inputs.cu_seqlens.to(torch.int64),
            use_cp="auto", backend="flashinfer")
        pool[idx.long()] = final.to(pool.dtype)
        inputs.out.copy_(o.reshape(inputs.out.shape))
        return Outputs(o=inputs.out, state=pool, path="vllm.flashinfer.prefill",
                       adapter_work=["q, k, v packed into the conv output", "vLLM's gather of ssm_state[idx] "
                                     "and scatter of the final state", "output copied into the caller's buffer"])
