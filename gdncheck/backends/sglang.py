"""SGLang's vendored Triton GDN kernel for decode / verify (optional; needs the ``sglang`` package).

Calls ``fused_sigmoid_gating_delta_rule_update`` the way SGLang's decode does: tokens packed as
``[1, B*T, H, K]`` with ``cu_seqlens``, raw gates (``A_log, a, dt_bias, b``; softplus beta 1,
threshold 20), V-last fp32 pool ``[P, HV, K, V]`` indexed by ``initial_state_indices``.
Not verified in this project's environment; padding is not declared (its convention there is
slot 0 as the dummy slot, which the caller reserves).
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version

import torch

from gdncheck.backends.base import Backend, Capabilities, Outputs
from gdncheck.data.case import Case
from gdncheck.inputs import Inputs

_MOD = "sglang.srt.layers.attention.fla.fused_sigmoid_gating_recurrent"


class SGLangTriton(Backend):
    """SGLang ``fused_sigmoid_gating_delta_rule_update`` (decode and verify, V-last, fp32 pool)."""

    name = "sglang"
    family = "sglang"
    caps = Capabilities(
        ops={"decode", "verify"}, dtypes={"bfloat16", "float16"}, state_dtypes={"float32"},
        layouts={"v_last"}, gva=True, gqa=False, varlen=False, pool=True, strided_pool=False,
        strided_gates=True, gate_sources={"raw"}, l2norm={True, False}, intermediate=False,
        disable_state_update=False, custom_scale=True, padding=set(), device="cuda",
    )
    padding_policy = {}
    twin = "twin-fla"

    def version(self) -> str:
        try:
            return _pkg_version("sglang")
        except PackageNotFoundError:
            return "not installed"

    def available(self) -> str | None:
        try:
            __import__(_MOD)
        except Exception as e:  # noqa: BLE001 - sglang pulls in many optional packages
            return f"sglang is not importable ({type(e).__name__}: {e})"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        if case.K > 256 or case.V > 256:
            return f"{self.name}: K, V <= 256"
        if case.write_indices is not None and case.write_indices != case.read_indices:
            return f"{self.name}: reads and writes the same slot"
        return None

    def run(self, inputs: Inputs) -> Outputs:
        import importlib
        fn = importlib.import_module(_MOD).fused_sigmoid_gating_delta_rule_update
        c = inputs.case
        B, T = c.B, c.T
        work = []
        dev = inputs.q.device
        if c.pool_size is None:
            pool, idx = inputs.state, torch.arange(B, dtype=torch.int32, device=dev)
            work.append("plain state passed as a pool with arange indices")
        else:
            pool, idx = inputs.state, inputs.read_indices
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=dev)
        pack = lambda t: t.reshape(1, B * T, *t.shape[2:])  # noqa: E731
        o = fn(A_log=inputs.A_log, a=pack(inputs.a), dt_bias=inputs.dt_bias, softplus_beta=1.0,
               softplus_threshold=20.0, q=pack(inputs.q), k=pack(inputs.k), v=pack(inputs.v),
               b=pack(inputs.b), initial_state_source=pool, initial_state_indices=idx,
               scale=c.scale, use_qk_l2norm_in_kernel=c.l2norm, cu_seqlens=cu)
        inputs.out.copy_(o.reshape(inputs.out.shape))
        work.append("output copied into the caller's buffer")
        return Outputs(o=inputs.out, state=pool, adapter_work=work, path="sglang.fused_sigmoid_gating")
