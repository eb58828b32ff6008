"""FlashInfer GDN adapters (K-last CuTe DSL kernels, SM90+), called as a serving engine calls them.

Every state tensor is K-last ``[.., HV, V, K]``; pools are indexed by the kernels themselves.

- :class:`FlashInferPrefill`: ``flashinfer.gdn_prefill.chunk_gated_delta_rule`` (packed varlen,
  K = V = 128). Two routes: the chunked kernel and the 4-launch context-parallel (CP) kernel,
  chosen by ``use_cp="auto"`` when ``N * HS * 2 < SM count``; the adapter option ``use_cp``
  forces one (``True`` / ``False``). ``g`` is alpha in linear space: the adapter passes
  ``exp(g)`` evaluated in fp32, as SGLang does (``alpha = exp(g.float())``).
- :class:`FlashInferDecode`: ``flashinfer.gdn_decode.gated_delta_rule_decode_pretranspose``.
  Paths: fp32 state T = 1 (legacy kernel), bf16 state K = V = 128 any T (fast path; T > 1
  runs the bf16 MTP kernel), fp32 state T > 1 with a pool (routed to ``gated_delta_rule_mtp``).
- :class:`FlashInferMTP`: ``flashinfer.gdn_decode.gated_delta_rule_mtp`` (verify, fp32 pool).
  Intermediate states go to ``intermediate_states_buffer`` (default) or, with the adapter option
  ``intermediate_mode="ssm"``, to pool slots named by ``ssm_state_indices``.

Padding policies (what index -1 does) differ per path; see each class and :meth:`policy`.
"""
from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version

import torch

from gdncheck import redzone
from gdncheck.backends.base import Backend, Capabilities, Outputs
from gdncheck.data.case import Case
from gdncheck.inputs import Inputs


def _fi_version() -> str:
    try:
        return _pkg_version("flashinfer-python")
    except PackageNotFoundError:
        try:
            import flashinfer
            return getattr(flashinfer, "__version__", "unknown")
        except Exception:  # noqa: BLE001 - an unimportable package has no version
            return "not installed"


def _fi_available(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 - import errors of the CuTe DSL are not all ImportError
        return f"{module} is not importable: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return f"FlashInfer GDN adapters are verified on SM90 only (device is SM{major}{minor})"
    return None


def _dt(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


class _FlashInferBase(Backend):
    family = "flashinfer"
    twin = "twin-flashinfer"
    ablation_notes = {"fast-math": "FlashInfer has no switch (its decode kernels always use fast exp/log)"}
    compile_hint_s = 10.0  # CuTe DSL / CUTLASS JIT per compile key

    def version(self) -> str:
        return _fi_version()


# ---------------------------------------------------------------------- prefill

class FlashInferPrefill(_FlashInferBase):
    """``chunk_gated_delta_rule``: packed varlen prefill, K = V = 128, precomputed alpha/beta.

    Pools are indexed with ``state_indices`` (read and write the same row; ``output_state is
    initial_state`` so the update is in place). Negative indices have no padding meaning here
    (the SM90 kernels use them as row numbers), so padded rows are unsupported. Plain-state
    cases pass ``initial_state [N, HS, V, K]`` and a NaN-poisoned ``output_state`` of the same
    shape and dtype, so rows the kernel leaves unwritten show up.

    Zero-length sequences: measured on SM90 (both routes), the kernel writes nothing for them
    (``zero_length_policy = "untouched"``): harmless in place on a pool, but a separate
    ``output_state`` keeps whatever it held (``torch.empty`` garbage when the API allocates it).
    GQA: FlashInfer's GQA means ``Hq = r * Hk`` with ``Hk == Hv``; in this project's cases q and k
    share H heads, so only GVA (``HV = r * H``) maps onto the kernel.

    Args:
        use_cp: ``"auto"`` (the engine default), ``True`` (context-parallel route) or ``False``.
    """

    name = "flashinfer-prefill"
    caps = Capabilities(empty_batch=False, 
        ops={"prefill"}, dtypes={"bfloat16", "float16"}, state_dtypes={"float32", "bfloat16", "float16"},
        layouts={"k_last"}, K={128}, V={128}, gva=True, gqa=False, varlen=True, pool=True,
        strided_pool=True, strided_gates=True, gate_sources={"precomputed"}, l2norm={True, False},
        intermediate=False, disable_state_update=False, custom_scale=True, padding=set(), device="cuda",
    )
    padding_policy = {}
    zero_length_policy = "untouched"
    # the adapter computes alpha = exp(g) in fp32 (the kernel takes linear-space alpha)
    ablation_knobs = frozenset({"exp-precision"})
    # The automatic route runs the kernels of the two forced routes, and FlashInfer keeps CuTe
    # DSL prefill builds in a per-process dict only: the three backends' cases of one shape form
    # one compile unit (one shard, one worker), so the automatic route reuses their builds.
    kernel_group = "flashinfer.prefill"

    def __init__(self, use_cp: str | bool = "auto"):
        if use_cp not in ("auto", True, False):
            raise ValueError(f"use_cp: 'auto', True or False, got {use_cp!r}")
        self.use_cp = use_cp

    def available(self) -> str | None:
        return _fi_available("flashinfer.gdn_prefill")

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        if case.write_indices is not None and case.write_indices != case.read_indices:
            return f"{self.name}: one state_indices tensor reads and writes (write_indices must equal read_indices)"
        if case.pool_size is not None and any(r < 0 for r in case.read_indices):
            return f"{self.name}: negative state_indices are not padding on this path"
        return None

    def route(self, case: Case) -> str:
        """``"cp"`` or ``"chunk"``: the route ``use_cp`` picks for ``case`` on this device."""
        if self.use_cp is True:
            return "cp"
        if self.use_cp is False:
            return "chunk"
        from flashinfer.gdn_kernels.delta_rule_dsl.varlen_helper import should_use_cp_host
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        cap = torch.cuda.get_device_capability()
        return "cp" if should_use_cp_host(case.N * case.HS, props.multi_processor_count,
                                          torch.cuda.get_device_name(), device_capability=cap) else "chunk"

    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.gdn_prefill import chunk_gated_delta_rule

        c = inputs.case
        work = ["alpha = exp(g) in fp32 by adapter (the kernel takes linear-space alpha)"]
        alpha = torch.exp(inputs.g[0].float()).contiguous()
        beta = inputs.beta[0].contiguous()
        pooled = c.pool_size is not None
        if pooled:
            state_in = state_out = inputs.state
            idx = inputs.read_indices
        else:
            state_in = inputs.state
            state_out = redzone.full_like_guarded(inputs.state, float("nan"), "output_state")
            idx = None
        route = self.route(c)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chunk_gated_delta_rule(
                q=inputs.q[0], k=inputs.k[0], v=inputs.v[0], g=alpha, beta=beta, scale=c.scale,
                initial_state=state_in, output_final_state=True, cu_seqlens=inputs.cu_seqlens,
                use_qk_l2norm_in_kernel=c.l2norm, output=inputs.out[0], output_state=state_out,
                use_cp=self.use_cp, state_indices=idx, max_seqlen=max(c.seqlens))
        fell_back = [str(w.message) for w in caught if "falling back to non-CP" in str(w.message)]
        if fell_back:
            route = "chunk"
            work.append(f"kernel fell back to the chunked route: {fell_back[0]}")
        return Outputs(o=inputs.out, state=state_out, intermediate=None, adapter_work=work,
                       path=f"prefill.{route}{'.pool' if pooled else ''}")


# ----------------------------------------------------------------------- decode

def _decode_path(case: Case) -> str:
    if case.state_dtype == "bfloat16":
        return "bf16_t1" if case.T == 1 else "bf16_mtp"
    return "fp32_t1" if case.T == 1 else "fp32_mtp"


def _bf16_mtp_kernel(case: Case) -> str:
    """Kernel of the bf16 T > 1 path: ``wide_vec`` once B*HV >= 128 (it skips the final-state
    write-back when intermediate states are cached), else ``ilp4``."""
    try:
        from flashinfer.gdn_kernels.gdn_decode_bf16_state import _select_wide_vec_tile_v
        return "wide_vec" if _select_wide_vec_tile_v(case.B, case.HS) is not None else "ilp4"
    except Exception:  # noqa: BLE001 - private helper; fall back to the documented threshold
        return "wide_vec" if case.B * case.HS >= 128 else "ilp4"


# CuTe DSL modules of the decode family: FlashInfer holds one file lock per module for a
# whole build (``JitSpecCuteDsl.build_and_load``), so its kernels compile one at a time.
_DECODE_MODULE = {"fp32_t1": "gdn_decode_pretranspose", "fp32_mtp": "gdn_decode_mtp",
                  "bf16_t1": "gdn_decode_bf16_state", "bf16_mtp": "gdn_decode_bf16_state"}


class FlashInferDecode(_FlashInferBase):
    """``gated_delta_rule_decode_pretranspose``: raw gates, K-last state or pool, in place.

    Paths and their padding (index -1 in ``initial_state_indices``), from the installed source:

    - ``fp32_t1`` (fp32 state, T = 1, K, V >= 128): padded row skipped, output zero, pool
      untouched -> ``skip``. A negative *output* index with a live read is redirected to slot 0.
    - ``bf16_t1`` / ``bf16_mtp`` (bf16 state, K = V = 128): -1 reads and writes slot 0, the
      sacrificial null slot; output undefined -> ``null_slot``.
    - ``fp32_mtp`` (fp32 pool, T > 1): ``gated_delta_rule_mtp``; padded row keeps the caller's
      output and the pool untouched -> ``caller_value``.

    ``intermediate_states_buffer`` and ``disable_state_update`` exist for T > 1 only; the buffer
    has the state's dtype (bf16 on the bf16 path: the adapter widens it to fp32 for the report).
    """

    name = "flashinfer-decode"
    caps = Capabilities(
        ops={"decode", "verify"}, dtypes={"bfloat16", "float16"}, state_dtypes={"float32", "bfloat16"},
        layouts={"k_last"}, gva=True, gqa=False, varlen=False, pool=True, strided_pool=True,
        strided_gates=True, gate_sources={"raw"}, l2norm={True, False}, intermediate=True,
        disable_state_update=True, custom_scale=True, padding={"skip", "null_slot", "caller_value"},
        device="cuda",
    )
    padding_policy = {"decode": "skip", "verify": "caller_value"}
    zero_length_policy = "passthrough"
    # fp32 verify runs ``gated_delta_rule_mtp``, the kernel of :class:`FlashInferMTP`'s buffer
    # mode: equal compile keys of the two backends are one compile unit.
    kernel_group = "flashinfer.decode"
    _POLICY = {"fp32_t1": "skip", "bf16_t1": "null_slot", "bf16_mtp": "null_slot", "fp32_mtp": "caller_value"}

    def available(self) -> str | None:
        return _fi_available("flashinfer.gdn_decode")

    def policy(self, case: Case) -> str:
        return self._POLICY[_decode_path(case)]

    def compile_lock(self, case: Case) -> str | None:
        return f"flashinfer:{_DECODE_MODULE[_decode_path(case)]}"

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        path = _decode_path(case)
        if path.startswith("bf16") and (case.K, case.V) != (128, 128):
            return f"{self.name}: bf16 state needs K = V = 128 (got K={case.K}, V={case.V})"
        if path.startswith("fp32") and (case.K < 128 or case.V < 128 or case.V % 8):
            return f"{self.name}: fp32 state needs K, V >= 128 and V % 8 == 0"
        if path == "fp32_mtp" and case.pool_size is None:
            return f"{self.name}: fp32 state with T > 1 needs a pool (routed to the MTP kernel)"
        if case.T == 1 and (case.disable_state_update or case.intermediate):
            return f"{self.name}: disable_state_update / intermediate states need T > 1"
        if case.write_indices is not None and case.pool_size is None:
            return f"{self.name}: write_indices need a pool"
        return None

    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.gdn_decode import gated_delta_rule_decode_pretranspose

        c = inputs.case
        path = _decode_path(c)
        work: list[str] = []
        kw = dict(q=inputs.q, k=inputs.k, v=inputs.v, A_log=inputs.A_log, a=inputs.a,
                  dt_bias=inputs.dt_bias, b=inputs.b, scale=c.scale, output=inputs.out,
                  use_qk_l2norm=c.l2norm)
        if c.pool_size is None:
            kw.update(state=inputs.state)
        else:
            kw.update(state=None, initial_state=inputs.state, initial_state_indices=inputs.read_indices,
                      output_state_indices=inputs.write_indices)
        inter = None
        if c.T > 1:
            kw.update(disable_state_update=c.disable_state_update)
            if c.intermediate:
                inter = redzone.empty_guarded("intermediate_states_buffer", inputs.intermediate.shape,
                                              inputs.state.dtype, inputs.state.device, fill=float("nan"))
                kw.update(intermediate_states_buffer=inter)
        o, _ = gated_delta_rule_decode_pretranspose(**kw)
        self.into_out(o, inputs, work, "output copied into the caller's buffer (the API returned a new tensor)")
        if inter is not None and inter.dtype != inputs.intermediate.dtype:
            inputs.intermediate.copy_(inter)
            work.append(f"intermediate {_dt(inter.dtype)} -> {_dt(inputs.intermediate.dtype)} for the report")
        elif inter is not None:
            inputs.intermediate.copy_(inter)
        if path == "bf16_mtp":
            path += "." + _bf16_mtp_kernel(c)
        return Outputs(o=inputs.out, state=inputs.state,
                       intermediate=inputs.intermediate if inter is not None else None,
                       adapter_work=work, path=f"decode.{path}")


# -------------------------------------------------------------------------- MTP

class FlashInferMTP(_FlashInferBase):
    """``gated_delta_rule_mtp``: speculative verify over an fp32 K-last pool, raw gates.

    Padding: ``initial_state_indices`` -1 skips read and write and leaves the caller's output
    (``caller_value``); ``output_state_indices`` -1 skips only the write. ``disable_state_update``
    is always passed (its ``None`` default means True with a warning).

    Args:
        intermediate_mode: ``"buffer"`` writes per-token states to ``intermediate_states_buffer
            [B, T, HV, V, K]`` (indexed by batch row); ``"ssm"`` scatters them into pool slots via
            ``ssm_state_indices [B, T]``: slots ``P + n*T + t`` of a pool the adapter extends by
            ``B*T`` scratch slots, except the last token of a live row, which goes to its write
            slot (so the pool ends as the oracle expects). The kernel then skips the final-state
            write-back (documented), so ``disable_state_update`` cannot be honoured there.
    """

    name = "flashinfer-mtp"
    caps = Capabilities(
        ops={"verify"}, dtypes={"bfloat16", "float16"}, state_dtypes={"float32"}, layouts={"k_last"},
        gva=True, gqa=False, varlen=False, pool=True, strided_pool=True, strided_gates=True,
        gate_sources={"raw"}, l2norm={True, False}, intermediate=True, disable_state_update=True,
        custom_scale=True, padding={"caller_value"}, device="cuda",
    )
    padding_policy = {"verify": "caller_value"}
    zero_length_policy = "passthrough"
    kernel_group: str | None = "flashinfer.decode"  # see FlashInferDecode; None in ssm mode

    def compile_lock(self, case: Case) -> str | None:
        return f"flashinfer:{_DECODE_MODULE['fp32_mtp']}"

    def __init__(self, intermediate_mode: str = "buffer"):
        if intermediate_mode not in ("buffer", "ssm"):
            raise ValueError(f"intermediate_mode: 'buffer' or 'ssm', got {intermediate_mode!r}")
        self.intermediate_mode = intermediate_mode
        if intermediate_mode == "ssm":
            self.kernel_group = None  # scatters through ssm_state_indices: kernels of its own

    def available(self) -> str | None:
        return _fi_available("flashinfer.gdn_decode")

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        if case.K < 128 or case.V < 128:
            return f"{self.name}: K, V >= 128"
        if self.intermediate_mode == "ssm":
            if not case.intermediate:
                return f"{self.name} (ssm mode): needs intermediate=True"
            if case.disable_state_update:
                return f"{self.name} (ssm mode): ssm_state_indices requires state writes"
            if case.pool_strided:
                return f"{self.name} (ssm mode): the adapter's extended pool is contiguous"
        return None

    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.gdn_decode import gated_delta_rule_mtp

        c = inputs.case
        B, T, HV = c.B, c.T, c.HS
        work: list[str] = []
        pool = inputs.state
        if c.pool_size is None:
            idx = torch.arange(B, dtype=torch.int32, device=pool.device)
            widx = None
            work.append("plain state passed as a pool with arange indices")
        else:
            idx, widx = inputs.read_indices, inputs.write_indices
        kw = dict(q=inputs.q, k=inputs.k, v=inputs.v, A_log=inputs.A_log, a=inputs.a,
                  dt_bias=inputs.dt_bias, b=inputs.b, scale=c.scale, output=inputs.out,
                  disable_state_update=c.disable_state_update, use_qk_l2norm=c.l2norm,
                  initial_state_indices=idx, output_state_indices=widx)
        inter = None
        if self.intermediate_mode == "ssm":
            P = pool.shape[0]
            ext = redzone.empty_guarded("extended pool (ssm_state_indices)", (P + B * T, *pool.shape[1:]),
                                        pool.dtype, pool.device)
            ext[:P].copy_(pool)
            ext[P:].fill_(float("nan"))
            ssm = (P + torch.arange(B * T, dtype=torch.int32, device=pool.device)).view(B, T)
            reads = idx.tolist()
            writes = widx.tolist() if widx is not None else reads
            for n in range(B):
                if reads[n] >= 0 and writes[n] >= 0:
                    ssm[n, T - 1] = writes[n]
            work.append(f"pool copied into an extended pool with B*T = {B * T} scratch slots for "
                        "ssm_state_indices, rows [0, P) copied back")
            gated_delta_rule_mtp(initial_state=ext, ssm_state_indices=ssm, **kw)
            pool.copy_(ext[:P])
            inter_rows = ext[ssm.long().view(-1)].view(B, T, *pool.shape[1:])
            inputs.intermediate.copy_(inter_rows)
            inter = inputs.intermediate
            path = "mtp.ssm_state_indices"
        else:
            if c.intermediate:
                inter = inputs.intermediate  # fp32 [B, T, HV, V, K], contiguous, NaN-poisoned
            gated_delta_rule_mtp(initial_state=pool, intermediate_states_buffer=inter, **kw)
            path = "mtp.buffer" if c.intermediate else "mtp"
        path += ".bhv_gt128" if B * HV > 128 else ".bhv_le128"  # two kernels split at B*HV = 128
        return Outputs(o=inputs.out, state=pool, intermediate=inter, adapter_work=work, path=path)


def prefill_cp() -> FlashInferPrefill:
    """Prefill forced onto the context-parallel route (``use_cp=True``)."""
    b = FlashInferPrefill(use_cp=True)
    b.name = "flashinfer-prefill-cp"
    return b


def prefill_chunk() -> FlashInferPrefill:
    """Prefill forced onto the direct chunk route (``use_cp=False``)."""
    b = FlashInferPrefill(use_cp=False)
    b.name = "flashinfer-prefill-chunk"
    return b


def mtp_ssm() -> FlashInferMTP:
    """MTP scattering per-token states into pool slots through ``ssm_state_indices``."""
    b = FlashInferMTP(intermediate_mode="ssm")
    b.name = "flashinfer-mtp-ssm"
    return b
