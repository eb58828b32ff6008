"""FLA 0.6.0 adapters (V-last Triton kernels; K-last through ``state_v_first=True``).

FLA has no pool indexing and no output buffer argument, so the adapter does what a serving
engine without pool-indexed kernels would do around the call, and lists it in
``Outputs.adapter_work``:

- gathers ``initial_state [N, HS, ...]`` from the pool rows ``read_indices`` (zeros for padded
  rows), calls the kernel, scatters the fp32 final states back into ``write_indices`` (cast to
  the pool dtype), and skips the scatter under ``disable_state_update``;
- applies padding policy ``skip`` itself: padded rows' output is set to zero and their pool
  rows are neither read nor written;
- copies the kernel's output into the caller's (NaN-poisoned) buffer.

Shapes: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``, g, beta ``[B, T, HV]``; prefill is packed
varlen (B = 1, ``cu_seqlens [N + 1]``). ``g`` is the log decay. Final states are fp32.
Zero-length sequences pass their initial state through (the recurrence runs zero steps).
"""
from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version

import torch

from gdncheck.backends.base import Backend, Capabilities, Outputs
from gdncheck.data.case import Case
from gdncheck.inputs import DTYPES, Inputs

_MAX_K = 256  # FLA's head-dim limit (one block along K)


def _import_fla():
    """Import FLA's GDN ops without letting FLA dispatch to another installed package.

    Triton's autotune choices are cached on disk (``TRITON_CACHE_AUTOTUNING=1`` unless the user
    set it): a block configuration picked once is reused by later processes on the machine, so
    repeated runs (gate vs baseline) time nothing again and compute with the same configuration.
    It is read when FLA's kernels are decorated, hence before the import.
    """
    os.environ.setdefault("FLA_DISABLE_BACKEND_DISPATCH", "1")
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def _import_problem() -> str | None:
    """Why triton or fla cannot be imported here, or None."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable: {e}"
    try:
        _import_fla()
    except ImportError as e:
        return f"fla (fla-core) is not importable: {e}"
    return None


def _fla_version() -> str:
    try:
        return _pkg_version("fla-core")
    except PackageNotFoundError:
        try:
            import fla
            return getattr(fla, "__version__", "unknown")
        except ImportError:
            return "not installed"


class _FLABase(Backend):
    family = "fla"
    kernel = "recurrent"  # or "chunk"
    caps = Capabilities(
        ops={"prefill", "decode", "verify"},
        dtypes={"bfloat16", "float16", "float32"},
        state_dtypes={"float32", "bfloat16", "float16"},
        layouts={"k_last", "v_last"},
        gva=True, gqa=False, varlen=True, pool=True, strided_pool=True, strided_gates=True,
        gate_sources={"raw", "precomputed"}, l2norm={True, False},
        intermediate=False, disable_state_update=True, custom_scale=True,
        padding={"skip"}, device="cuda",
    )
    padding_policy = {"prefill": "skip", "decode": "skip", "verify": "skip"}
    zero_length_policy = "passthrough"
    twin = "twin-fla"
    compile_hint_s = 5.0
    # FLA_USE_FAST_OPS=1 swaps in fast exp/log at import: arm B runs in a fresh process
    ablation_knobs = frozenset({"fast-math"})

    def version(self) -> str:
        return _fla_version()

    def compile_key(self, case: Case) -> tuple:
        """FLA's kernels do not specialise on T (``do_not_specialize=['T']``) and autotune on
        heads, dims and flags: cases differing only in T, N or the pool reuse the compiled kernels."""
        return (self.kernel, case.op == "prefill", case.H, case.HV, case.K, case.V, case.dtype, case.state_dtype,
                case.layout, case.l2norm, case.gate_source)

    def autotune_key(self, case: Case) -> tuple:
        """The expensive part of a compile key (a cost-model hint, ``gdncheck.shard``): measured on
        the H100, a shape's first prefill and first other op each take 25-90 s cold, while l2norm
        and gate-source variants of one of them build in 0-3 s in the same process."""
        return (self.kernel, case.op == "prefill", case.H, case.HV, case.K, case.V, case.dtype,
                case.state_dtype, case.layout)

    def schedule_key(self, case: Case) -> tuple:
        """Cases that belong in one process: the chunk kernels that pass states and write outputs
        autotune on heads, dims and layout only, so prefill and decode (varlen or not, raw or
        precomputed gates) of one shape share their autotuning when one process runs both."""
        return (self.kernel, case.H, case.HV, case.K, case.V, case.dtype, case.state_dtype, case.layout)

    def available(self) -> str | None:
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "TRITON_INTERPRET=1 is set in this process (Triton would interpret, not compile)"
        why = _import_problem()
        if why:
            return why
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        if case.K > _MAX_K or case.V > _MAX_K:
            return f"{self.name} supports K, V <= {_MAX_K} (got K={case.K}, V={case.V})"
        if case.HV % case.H:
            return f"{self.name} needs HV divisible by H (GVA), got H={case.H}, HV={case.HV}"
        if case.write_indices is not None and case.pool_size is None:
            return f"{self.name}: write_indices need a pool"
        return None

    # ------------------------------------------------------------------ run

    def _call(self, inputs: Inputs, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One kernel call; returns ``(o [B, T, HV, V], final_state [N, HV, ...] fp32)``."""
        c = inputs.case
        chunk, recurrent = _import_fla()
        kw = dict(q=inputs.q, k=inputs.k, v=inputs.v, scale=c.scale, initial_state=h0,
                  output_final_state=True, use_qk_l2norm_in_kernel=c.l2norm,
                  state_v_first=(c.layout == "k_last"), cu_seqlens=inputs.cu_seqlens)
        if c.gate_source == "raw":
            kw.update(g=inputs.a, beta=inputs.b, use_gate_in_kernel=True, A_log=inputs.A_log,
                      dt_bias=inputs.dt_bias, use_beta_sigmoid_in_kernel=True)
        else:
            kw.update(g=inputs.g, beta=inputs.beta)
        fn = chunk if self.kernel == "chunk" else recurrent
        return fn(**kw)

    def run(self, inputs: Inputs) -> Outputs:
        c = inputs.case
        work: list[str] = []
        N = c.N
        sshape = tuple(inputs.state.shape[1:])
        pool = inputs.state
        if c.pool_size is None:
            reads = list(range(N))
            writes = reads
        else:
            reads = inputs.read_indices.tolist()
            writes = inputs.write_indices.tolist() if inputs.write_indices is not None else reads
            work.append("pool gather/scatter by adapter (FLA has no pool indexing)")
        padded = [r < 0 for r in reads]
        if any(padded):
            work.append("padding policy 'skip' applied by adapter (padded rows: zero state in, "
                        "zero output, no write)")
        h0 = torch.zeros((N, *sshape), dtype=pool.dtype, device=pool.device)
        live = [n for n in range(N) if not padded[n]]
        if live:
            h0[live] = pool[torch.tensor([reads[n] for n in live], device=pool.device)]
        o, ht = self._call(inputs, h0)
        if c.dtype != "float32" and o.dtype != DTYPES[c.dtype]:
            raise RuntimeError(f"FLA returned output dtype {o.dtype}, expected {c.dtype}")
        # padded rows: output zero (prefill: their token span in the packed batch)
        if any(padded):
            if c.op == "prefill":
                cu = inputs.cu_seqlens.tolist()
                for n in range(N):
                    if padded[n]:
                        o[:, cu[n]:cu[n + 1]] = 0
            else:
                o[torch.tensor([n for n in range(N) if padded[n]], device=o.device)] = 0
        inputs.out.copy_(o)
        work.append("output copied into the caller's buffer (FLA allocates its own)")
        if ht.dtype != pool.dtype:
            work.append(f"final state {str(ht.dtype).removeprefix('torch.')} -> "
                        f"{str(pool.dtype).removeprefix('torch.')} on scatter")
        if not c.disable_state_update:
            for n in range(N):
                if padded[n] or writes[n] < 0:
                    continue
                pool[writes[n]] = ht[n].to(pool.dtype)
        else:
            work.append("disable_state_update: adapter skips the scatter")
        return Outputs(o=inputs.out, state=pool, intermediate=None, adapter_work=work,
                       path=f"fla.{self.kernel}.{'k_last' if c.layout == 'k_last' else 'v_last'}."
                            f"{'gate_in_kernel' if c.gate_source == 'raw' else 'precomputed'}")


class FLARecurrent(_FLABase):
    """``fused_recurrent_gated_delta_rule`` on CUDA: one token at a time, fp32 state in registers."""

    name = "fla-recurrent"
    kernel = "recurrent"


class FLAChunk(_FLABase):
    """``chunk_gated_delta_rule`` on CUDA: chunks of 64 tokens (WY form), bf16 intermediates."""

    name = "fla-chunk"
    kernel = "chunk"
    compile_hint_s = 40.0  # five autotuned Triton kernels per new (H, HV, layout, dtype)


class FLAInterpreter(_FLABase):
    """``fused_recurrent_gated_delta_rule`` run by Triton's interpreter on the CPU (CI backend).

    The interpreter computes in fp32 with numpy and truncates fp32 -> bf16 on stores instead of
    rounding to nearest even; it is slow, so K and V are capped at 64. ``TRITON_INTERPRET=1`` must
    be set before Triton compiles FLA's kernels: this backend sets it, and refuses to run in a
    process where FLA was already imported without it.
    """

    name = "fla-interp"
    kernel = "recurrent"
    caps = _FLABase.caps.model_copy(update={"device": "cpu"})
    ablation_knobs = frozenset()
    ablation_notes = {"fast-math": "the Triton interpreter has no libdevice fast_expf (FLA_USE_FAST_OPS=1 fails to run)"}
    _MAX_DIM = 64

    def available(self) -> str | None:
        if "fla" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            return "fla was imported in this process without TRITON_INTERPRET=1"
        os.environ["TRITON_INTERPRET"] = "1"
        return _import_problem()

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        if case.K > self._MAX_DIM or case.V > self._MAX_DIM:
            return f"{self.name}: K, V <= {self._MAX_DIM} under the interpreter (too slow beyond)"
        return None

    def run(self, inputs: Inputs) -> Outputs:
        why = self.available()
        if why:
            raise RuntimeError(why)
        out = super().run(inputs)
        out.path = out.path.replace("fla.recurrent", "fla.recurrent.interpreter")
        return out
