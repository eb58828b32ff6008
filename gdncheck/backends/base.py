"""The backend protocol: a small adapter that declares what it supports and runs one call.

A backend receives :class:`~gdncheck.cases.Inputs` (already on its device, output buffers
NaN-poisoned) and returns :class:`Outputs`. It must call the kernel the way a serving engine
does; any work of its own (gathering a pool for a kernel without pool indexing, converting a
layout) is listed in ``Outputs.adapter_work`` so reports can say so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, Field

from gdncheck.data.case import Case
from gdncheck.inputs import Inputs


@dataclass
class Outputs:
    """What a backend returns.

    Attributes:
        o: ``[B, T, HS, V]`` the output buffer (``inputs.out`` written in place, or a new tensor).
        state: pool ``[P, HS, ...]`` after the call (pool cases) or final state ``[N, HS, ...]``,
            in ``case.layout``; None when the call produces no state.
        intermediate: ``[B, T, HS, ...]`` per-token states (verify) or None.
        adapter_work: what the adapter did around the kernel (e.g. "pool gather/scatter").
        path: which kernel path ran (e.g. "decode.fp32_t1", "prefill.cp").
    """

    o: torch.Tensor
    state: torch.Tensor | None
    intermediate: torch.Tensor | None = None
    adapter_work: list[str] = field(default_factory=list)
    path: str = ""


class Capabilities(BaseModel):
    """What a backend declares it can run. Empty sets mean 'any'."""

    ops: set[str] = Field(default_factory=lambda: {"prefill", "decode", "verify"})
    dtypes: set[str] = Field(default_factory=lambda: {"bfloat16", "float16", "float32"})
    state_dtypes: set[str] = Field(default_factory=lambda: {"float32", "bfloat16", "float16"})
    layouts: set[str] = Field(default_factory=lambda: {"k_last", "v_last"})
    K: set[int] = Field(default_factory=set, description="supported K; empty = any")
    V: set[int] = Field(default_factory=set, description="supported V; empty = any")
    gva: bool = True
    gqa: bool = False
    varlen: bool = True
    pool: bool = True
    strided_pool: bool = True
    strided_gates: bool = True
    gate_sources: set[str] = Field(default_factory=lambda: {"raw", "precomputed"})
    l2norm: set[bool] = Field(default_factory=lambda: {True, False})
    intermediate: bool = True
    disable_state_update: bool = True
    custom_scale: bool = True
    empty_batch: bool = Field(True, description="takes a packed prefill batch of T = 0 tokens (engines never send one)")
    padding: set[str] = Field(default_factory=lambda: {"skip", "null_slot", "caller_value"},
                              description="padding policies this backend can honour")
    device: str = Field("cpu", description="where it runs: 'cpu' (always the CPU), 'cuda', or 'any' (the run's device)")


class Backend:
    """Base class for adapters. Subclasses set ``name``/``family``/``caps`` and implement ``run``."""

    name: ClassVar[str] = "backend"
    family: ClassVar[str] = "custom"  # kernel family: flashinfer | fla | sglang | twin | custom
    caps: Capabilities = Capabilities()
    # per-op padding policy this backend implements; None = no padding support
    padding_policy: ClassVar[dict[str, str]] = {"prefill": "skip", "decode": "skip", "verify": "caller_value"}
    zero_length_policy: ClassVar[str] = "passthrough"
    # precision twin modelling this backend's rounding (name in the registry), for floors
    twin: ClassVar[str | None] = None
    # rough seconds a new compile key costs on first call: a scheduling hint only, so that
    # parallel runs (``--jobs``) start the longest compiles first
    compile_hint_s: ClassVar[float] = 0.0
    # adapters that pass ``Case.call`` (entry-point arguments) to their kernel; others refuse such cases
    understands_call: ClassVar[bool] = False

    # ablation switches this backend can express (``gdncheck ablate``): names from
    # gdncheck.ablate.SWITCH_NAMES; the twins take all of them through constructor knobs
    ablation_knobs: ClassVar[frozenset[str]] = frozenset()
    # why a switch is not expressible on this backend, where that is worth saying (switch -> why)
    ablation_notes: ClassVar[dict[str, str]] = {}

    def version(self) -> str:
        return "n/a"

    def compile_key(self, case: Case) -> tuple:
        """Cases with equal keys reuse one compiled kernel (T, heads, dims, dtypes, layout, scale
        are compile-time for most kernels); the first case of a key reports its compile time."""
        return (case.op, case.T if case.op != "prefill" else 0, case.H, case.HV, case.K, case.V, case.dtype,
                case.state_dtype, case.layout, case.scale, case.l2norm, case.gate_source, case.intermediate)

    def schedule_key(self, case: Case) -> tuple:
        """Cases with equal keys run in one process one after another (a compile unit): the compile
        key, or a coarser key where the kernels share compiled or autotuned state across keys."""
        return self.compile_key(case)

    def compile_lock(self, case: Case) -> str | None:
        """Name of a lock under which the kernel package compiles ``case``'s kernel, one build at a
        time across all processes (None: builds run in parallel). Parallel runs give such builds
        one lane at a time and start them first, since they form a serial chain."""
        return None

    def available(self) -> str | None:
        """None when the backend can run here, else why not (package missing, no GPU...)."""
        return None

    def policy(self, case: Case) -> str:
        """Padding policy of the path ``case`` takes."""
        return self.padding_policy.get(case.op, "skip")

    def supports(self, case: Case) -> str | None:
        """None when ``case`` can run, else the reason it is unsupported."""
        c = self.caps
        if case.call and not self.understands_call:
            return f"{self.name} does not take entry-point arguments (the case pins {sorted(case.call)})"
        checks = [
            (case.op in c.ops, f"op {case.op}"),
            (case.dtype in c.dtypes, f"dtype {case.dtype}"),
            (case.state_dtype in c.state_dtypes, f"state_dtype {case.state_dtype}"),
            (case.layout in c.layouts, f"layout {case.layout}"),
            (not c.K or case.K in c.K, f"K={case.K} (supports {sorted(c.K)})"),
            (not c.V or case.V in c.V, f"V={case.V} (supports {sorted(c.V)})"),
            (c.gva or case.HV <= case.H, "GVA (HV > H)"),
            (c.gqa or case.H <= case.HV, "GQA (H > HV)"),
            (c.pool or case.pool_size is None, "state pools"),
            (c.strided_pool or not case.pool_strided, "strided pools"),
            (c.strided_gates or not case.gate_strided, "strided a/b"),
            (case.gate_source in c.gate_sources, f"gate_source {case.gate_source}"),
            (case.l2norm in c.l2norm, f"l2norm={case.l2norm}"),
            (c.intermediate or not case.intermediate, "intermediate states"),
            (c.disable_state_update or not case.disable_state_update, "disable_state_update"),
            (c.custom_scale or case.scale is None or abs(case.scale - case.K ** -0.5) < 1e-12, "custom scale"),
            (c.empty_batch or case.op != "prefill" or case.T > 0,
             "an empty packed batch (T = 0), a call no engine makes"),
        ]
        for ok, what in checks:
            if not ok:
                return f"{self.name} does not support {what}"
        if case.padded_rows or (case.write_indices and any(w < 0 for w in case.write_indices)):
            pol = self.policy(case)
            if pol not in c.padding:
                return f"{self.name} does not support padding on {case.op}"
            if case.padding is not None and case.padding != pol:
                return f"{self.name} {case.op} pads with policy {pol!r}, case expects {case.padding!r}"
        return None

    def run(self, inputs: Inputs) -> Outputs:
        raise NotImplementedError

    @staticmethod
    def into_out(o: torch.Tensor, inputs: Inputs, work: list[str],
                 note: str = "output copied into the caller's buffer") -> None:
        """An API that may return a new output tensor instead of writing ``inputs.out``: copy ``o``
        into the caller's (poisoned) buffer when it is another tensor, and say so in ``work``."""
        if o.data_ptr() != inputs.out.data_ptr():
            inputs.out.copy_(o)
            work.append(note)
