"""SGLang 0.5.23's own GDN kernels, called as ``sglang/srt/layers/attention/linear/gdn_backend.py``
and ``kernels/gdn_triton.py`` call them. Every state is K-last: pool ``[P, HV, V, K]``; SGLang's
pool reserves slot 0 as its dummy slot and pads with -1.

Paths (``gdncheck.backends.engines`` loads the kernel modules without SGLang's server stack):

- :class:`SGLangPackedDecode` (``sglang-decode``): ``fused_recurrent_gated_delta_rule_packed_decode``,
  the production decode (``TritonGDNKernel.packed_decode``): q, k, v packed in one
  ``mixed_qkv [B, 2*H*K + HV*V]`` row per request (the conv output), raw gates ``a, b [B, HV]``,
  ``ssm_state_indices [B]`` read and written in place. Rounding: g, exp(g), beta in fp32 in the
  kernel, **beta rounded to b's dtype** (bf16) first; L2 norm ``x / sqrt(sum x^2 + 1e-6)``.
  Padding (index < 0): output zero, no read, no write -> ``skip``.
- :class:`SGLangFusedSigmoid` (``sglang-fused-sigmoid``): ``fused_sigmoid_gating_delta_rule_update``.
  Decode (``TritonGDNKernel.decode``): q, k, v ``[1, B, H|HV, K|V]`` with ``cu_seqlens = arange``.
  Target verify (``TritonGDNKernel.target_verify``): ``[1, B*T, ...]``, ``disable_state_update=True``,
  per-step states in ``intermediate_states_buffer [rows, T, HV, V, K]`` at row
  ``intermediate_state_indices[n] = n``, ``cache_steps = T``; SGLang then scatters the accepted
  step into the pool (the adapter does this for the last step when the case updates the state:
  all T tokens accepted). Rounding: beta fp32 (not rounded); L2 norm ``x * (1 / sqrt(sum + 1e-6))``.
  Padding (index < 0): the row runs from a zero state, writes its output, skips the pool write.
  Declared as ``null_slot`` (output undefined, slot 0 unchecked), the nearest weaker contract;
  ``tests/test_engines.py`` checks the exact behaviour.
- :class:`SGLangExtend` (``sglang-extend``, CUDA): ``g, beta = fused_gdn_gating(A_log, a, b, dt_bias)``
  (g fp32; **beta = sigmoid(b) rounded to b's dtype**, stored fp32), then
  ``chunk_gated_delta_rule(q, k, v, g, beta, initial_state=pool, initial_state_indices,
  cu_seqlens, head_first=False, use_qk_l2norm_in_kernel=True, inplace_update=True)``; exp(g) in
  the kernels, fp32; chunk intermediates in bf16 (``A`` kept bf16). Index < 0: zero initial state,
  no write -> output computed, declared ``null_slot`` as above.

``*-interp`` variants run the same calls on the CPU under ``TRITON_INTERPRET=1`` (K, V <= 64).
Precision twins: ``twin-fla`` (recurrent fp32 state, fp32 gates) for fused_sigmoid,
``twin-fla-beta-bf16`` (the same with beta rounded to bf16) for the packed decode and extend.
"""
from __future__ import annotations

import torch

from gdncheck.backends.base import Capabilities, Outputs
from gdncheck.backends.engines import EngineBackend, interp_variant
from gdncheck.data.case import Case
from gdncheck.inputs import Inputs

_FS = "linear.fused_sigmoid_gating_recurrent"
_FR = "fla.fused_recurrent"
_GATING = "linear.fused_gdn_gating"
_CHUNK = "fla.chunk"

_RECURRENT_CAPS = Capabilities(
    ops={"decode", "verify"}, dtypes={"bfloat16", "float16", "float32"}, state_dtypes={"float32", "bfloat16"},
    layouts={"k_last"}, gva=True, gqa=False, varlen=False, pool=True, strided_pool=True,
    strided_gates=True, gate_sources={"raw"}, l2norm={True, False}, intermediate=True,
    disable_state_update=True, custom_scale=True, padding={"null_slot"}, device="cuda",
)


def _pool(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(pool, indices [N] int32, adapter work)``; a plain state becomes a pool read at arange."""
    c = inputs.case
    if c.pool_size is None:
        idx = torch.arange(c.N, dtype=torch.int32, device=inputs.state.device)
        return inputs.state, idx, ["plain state passed as a pool with arange indices"]
    return inputs.state, inputs.read_indices, []


def _one_slot(be, case: Case) -> str | None:
    if case.write_indices is not None and case.write_indices != case.read_indices:
        return f"{be.name}: one index tensor reads and writes (write_indices must equal read_indices)"
    return None


def twin_beta_bf16():
    """FLA's twin with beta rounded to bf16: SGLang's packed decode and ``fused_gdn_gating``."""
    from gdncheck.backends.twins import FLATwin

    t = FLATwin(beta_dtype="bfloat16")
    t.name = t.twin = "twin-fla-beta-bf16"
    return t


class SGLangPackedDecode(EngineBackend):
    """``fused_recurrent_gated_delta_rule_packed_decode``: SGLang's production decode (T = 1)."""

    name = "sglang-decode"
    family = "sglang"
    pkg = "sglang"
    modules = (_FR,)
    twin = "twin-fla-beta-bf16"
    caps = _RECURRENT_CAPS.model_copy(update={"ops": {"decode"}, "intermediate": False,
                                              "disable_state_update": False, "padding": {"skip"},
                                              "l2norm": {True}})
    padding_policy = {"decode": "skip"}
    beta_rounded = True  # sigmoid(b) rounded to b's dtype in the kernel

    def supports(self, case: Case) -> str | None:
        return super().supports(case) or _one_slot(self, case)

    def run(self, inputs: Inputs) -> Outputs:
        c = inputs.case
        B, H, HV, K, V = c.B, c.H, c.HS, c.K, c.V
        pool, idx, work = _pool(inputs)
        # the conv output SGLang hands the kernel: one [q | k | v] row per request
        mixed = self.packed_qkv(inputs)
        work.append("q, k, v packed into mixed_qkv [B, 2*H*K + HV*V] (SGLang's conv output)")
        self.mod(_FR).fused_recurrent_gated_delta_rule_packed_decode(
            mixed_qkv=mixed, a=inputs.a.reshape(B, HV), b=inputs.b.reshape(B, HV), A_log=inputs.A_log,
            dt_bias=inputs.dt_bias, scale=c.scale if c.scale is not None else K ** -0.5,
            initial_state=pool, out=inputs.out, ssm_state_indices=idx,
            use_qk_l2norm_in_kernel=True)
        return Outputs(o=inputs.out, state=pool, adapter_work=work, path="sglang.packed_decode")


class SGLangFusedSigmoid(EngineBackend):
    """``fused_sigmoid_gating_delta_rule_update``: decode (T = 1) and target verify (T > 1)."""

    name = "sglang-fused-sigmoid"
    family = "sglang"
    pkg = "sglang"
    modules = (_FS,)
    twin = "twin-fla"
    caps = _RECURRENT_CAPS
    padding_policy = {"decode": "null_slot", "verify": "null_slot"}
    beta_rounded = False

    def supports(self, case: Case) -> str | None:
        why = super().supports(case) or _one_slot(self, case)
        if why:
            return why
        if case.op == "decode" and case.disable_state_update:
            return f"{self.name}: SGLang's decode always writes the state"
        return None

    def run(self, inputs: Inputs) -> Outputs:
        c = inputs.case
        B, T, HV = c.B, c.T, c.HS
        pool, idx, work = _pool(inputs)
        dev = pool.device
        flat = lambda t: t.reshape(1, B * T, *t.shape[2:])  # noqa: E731 - SGLang packs tokens
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=dev)
        kw = dict(A_log=inputs.A_log, dt_bias=inputs.dt_bias, q=flat(inputs.q), k=flat(inputs.k),
                  v=flat(inputs.v), a=inputs.a.reshape(B * T, HV), b=inputs.b.reshape(B * T, HV),
                  initial_state_source=pool, initial_state_indices=idx, cu_seqlens=cu,
                  use_qk_l2norm_in_kernel=c.l2norm, softplus_beta=1.0, softplus_threshold=20.0,
                  scale=c.scale)
        fn = self.mod(_FS).fused_sigmoid_gating_delta_rule_update
        inter = None
        if c.op == "decode":
            o = fn(**kw)
            path = "sglang.fused_sigmoid.decode"
        else:
            # SGLang's speculative scratch: [rows, steps, HV, V, K] in the pool's dtype, row n per request
            buf = torch.full((B + 1, T, *pool.shape[1:]), float("nan"), dtype=pool.dtype, device=dev)
            rows = torch.arange(B, dtype=torch.int32, device=dev)
            o = fn(**kw, is_kda=False, disable_state_update=True, intermediate_states_buffer=buf,
                   intermediate_state_indices=rows, cache_steps=T, retrieve_parent_token=None)
            path = "sglang.fused_sigmoid.target_verify"
            if c.intermediate:
                inputs.intermediate.copy_(buf[:B])
                inter = inputs.intermediate
            if not c.disable_state_update:
                reads = idx.tolist()
                live = [n for n in range(B) if reads[n] >= 0]
                if live:
                    sel = torch.tensor(live, device=dev)
                    pool[idx[sel].long()] = buf[sel, T - 1]
                work.append("accepted step scattered from the intermediate buffer into the pool "
                            "(SGLang's post-verify update, all T tokens accepted)")
        inputs.out.copy_(o.reshape(inputs.out.shape))
        work.append("output copied into the caller's buffer (the kernel allocates its own)")
        return Outputs(o=inputs.out, state=pool, intermediate=inter, adapter_work=work, path=path)


class SGLangExtend(EngineBackend):
    """``fused_gdn_gating`` then ``chunk_gated_delta_rule`` (prefill / extend, in-place pool)."""

    name = "sglang-extend"
    family = "sglang"
    pkg = "sglang"
    modules = (_GATING, _CHUNK)
    twin = "twin-fla-beta-bf16"
    caps = Capabilities(empty_batch=False, 
        ops={"prefill"}, dtypes={"bfloat16"}, state_dtypes={"float32", "bfloat16"}, layouts={"k_last"},
        gva=True, gqa=False, varlen=True, pool=True, strided_pool=False, strided_gates=True,
        gate_sources={"raw"}, l2norm={True}, intermediate=False, disable_state_update=False,
        custom_scale=False, padding={"null_slot"}, device="cuda")
    padding_policy = {"prefill": "null_slot"}
    zero_length_policy = "passthrough"
    beta_rounded = True
    compile_hint_s = 40.0

    def supports(self, case: Case) -> str | None:
        return super().supports(case) or _one_slot(self, case)

    def compile_key(self, case: Case) -> tuple:
        return (self.name, case.H, case.HV, case.K, case.V, case.dtype, case.state_dtype)

    def run(self, inputs: Inputs) -> Outputs:
        c = inputs.case
        T, HV = c.T, c.HS
        pool, idx, work = _pool(inputs)
        g, beta = self.mod(_GATING).fused_gdn_gating(inputs.A_log, inputs.a.reshape(T, HV),
                                                     inputs.b.reshape(T, HV), inputs.dt_bias)
        o, _, _ = self.mod(_CHUNK).chunk_gated_delta_rule(
            q=inputs.q, k=inputs.k, v=inputs.v, g=g, beta=beta, initial_state=pool,
            initial_state_indices=idx, cu_seqlens=inputs.cu_seqlens, head_first=False,
            use_qk_l2norm_in_kernel=True, inplace_update=True)
        inputs.out.copy_(o.reshape(inputs.out.shape))
        work.append("output copied into the caller's buffer (the kernel allocates its own)")
        return Outputs(o=inputs.out, state=pool, adapter_work=work, path="sglang.extend.chunk")


SGLangPackedDecodeInterp = interp_variant(SGLangPackedDecode)
SGLangFusedSigmoidInterp = interp_variant(SGLangFusedSigmoid)
SGLangExtendInterp = interp_variant(
    SGLangExtend, ", with the chunk fixes of :func:`gdncheck.backends.engines.interpreter_fixes` "
    "(bf16 dots, first autotune config)")
