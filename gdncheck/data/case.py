"""The case model: a declarative, hashable description of one kernel call.

Token layout of the tensors a case builds (``HS = max(H, HV)``)::

    prefill  packed varlen: B = 1, T = sum(seqlens), cu_seqlens [N + 1]
    decode   B = N, T = 1
    verify   B = N, T = seqlens[0] (all equal, >= 2), intermediate states per token

Imports nothing but pydantic: every layer above builds on it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Op = Literal["prefill", "decode", "verify"]
DType = Literal["bfloat16", "float16", "float32"]
GateDist = Literal["model", "alpha_one", "alpha_tiny", "softplus_high", "softplus_low", "beta_zero", "beta_one",
                   # edges (see gdncheck/edges.py): a + dt_bias and b far past every fp32/bf16 overflow point
                   "softplus_huge", "softplus_huge_neg", "beta_logit_huge", "decay_underflow"]
Padding = Literal["skip", "null_slot", "caller_value"]
ValueEdge = Literal["qk_zero", "qk_tiny", "v_huge", "v_subnormal", "poison_padding"]

_ID_EXCLUDE = {"name", "tags"}
# Fields a case id has hashed from the start. A field added later enters the id only when it is
# set to something other than its default, so the ids of existing cases (and every results file
# and baseline keyed on them) stay valid.
_ID_V1 = frozenset({
    "op", "seqlens", "H", "HV", "K", "V", "dtype", "gate_dtype", "state_dtype", "layout", "scale", "l2norm",
    "gate_source", "gate_dist", "v_scale", "qk_scale", "state_scale", "pool_size", "read_indices",
    "write_indices", "padding", "disable_state_update", "intermediate", "pool_strided", "gate_strided", "seed"})


class Case(BaseModel):
    """One kernel call. Fields other than ``name`` and ``tags`` define :attr:`id`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Op = Field(description="prefill (packed varlen), decode (T = 1) or verify (T > 1, intermediate states)")
    seqlens: list[int] = Field(description="tokens per sequence, N entries; 0 is a zero-length sequence")
    H: int = Field(16, gt=0, description="q/k heads")
    HV: int = Field(32, gt=0, description="v heads")
    K: int = Field(128, gt=0, description="key head dim")
    V: int = Field(128, gt=0, description="value head dim")
    dtype: DType = Field("bfloat16", description="q, k, v and output dtype")
    gate_dtype: DType = Field("bfloat16", description="dtype of the raw gate inputs a, b")
    state_dtype: DType = Field("float32", description="state / pool dtype")
    layout: Literal["k_last", "v_last"] = Field("k_last", description="state layout handed to the kernel")
    scale: float | None = Field(None, description="q scale; None = K ** -0.5")
    l2norm: bool = Field(True, description="q/k L2-normalised inside the kernel")
    gate_source: Literal["raw", "precomputed"] = Field(
        "precomputed", description="kernel gets raw A_log/a/dt_bias/b, or precomputed g (fp32) and beta (fp32)")
    gate_dist: GateDist = Field("model", description="distribution of the raw gate inputs")
    v_scale: float = Field(1.0, gt=0, description="std of v")
    qk_scale: float = Field(1.0, gt=0, description="std of q and k")
    state_scale: float = Field(0.3, ge=0, description="std of the initial state / pool entries")
    pool_size: int | None = Field(None, gt=0, description="P slots; None = plain initial/final state [N, ...]")
    read_indices: list[int] | None = Field(None, description="[N] pool slot read per sequence; negative = padding")
    write_indices: list[int] | None = Field(None, description="[N] pool slot written; None = the read slot")
    padding: Padding | None = Field(None, description="padding policy the case expects; None = the backend's own")
    disable_state_update: bool = Field(False, description="the call must not write the pool")
    intermediate: bool = Field(False, description="request per-token intermediate states (verify)")
    pool_strided: bool = Field(False, description="pool is a non-contiguous view (slot stride > slot size)")
    gate_strided: bool = Field(False, description="a and b are strided views of one projection output")
    seed: int = Field(0, ge=0, description="seed of the CPU generator that builds every tensor")
    call: dict[str, str | int | float | bool | list[int] | None] = Field(
        default_factory=dict, description="entry-point argument values this case pins (names and legal values: the "
        "backend's ``arguments``, gdncheck/backends/api_spec.py); paged cases: page_size, prefix_lens")
    value_edge: ValueEdge | None = Field(None, description="input values at the numeric edges (gdncheck/edges.py)")
    name: str | None = Field(None, description="human label (not part of the id)")
    tags: list[str] = Field(default_factory=list, description="suite tags (not part of the id)")

    @model_validator(mode="after")
    def _check(self) -> "Case":
        N = len(self.seqlens)
        if N == 0:
            raise ValueError("seqlens: at least one sequence")
        if any(s < 0 for s in self.seqlens):
            raise ValueError("seqlens: lengths must be >= 0")
        HS = max(self.H, self.HV)
        if HS % self.H or HS % self.HV:
            raise ValueError(f"HV: one head count must be a multiple of the other, got H={self.H}, HV={self.HV}")
        if self.op == "decode" and any(s != 1 for s in self.seqlens):
            raise ValueError("seqlens: decode has T = 1 for every sequence")
        if self.op == "verify" and (len(set(self.seqlens)) != 1 or self.seqlens[0] < 2):
            raise ValueError("seqlens: verify needs one common T >= 2")
        if self.intermediate and self.op != "verify":
            raise ValueError("intermediate: only verify produces intermediate states")
        if self.pool_size is None:
            if self.read_indices is not None or self.write_indices is not None:
                raise ValueError("read_indices: needs pool_size")
            if self.pool_strided:
                raise ValueError("pool_strided: needs pool_size")
        else:
            if self.read_indices is None:
                raise ValueError("read_indices: required with pool_size")
            for nm in ("read_indices", "write_indices"):
                idx = getattr(self, nm)
                if idx is None:
                    continue
                if len(idx) != N:
                    raise ValueError(f"{nm}: one entry per sequence (N={N}), got {len(idx)}")
                if any(i >= self.pool_size for i in idx):
                    raise ValueError(f"{nm}: index out of the pool (pool_size={self.pool_size})")
            if not self.disable_state_update:
                w = self.write_indices or self.read_indices
                live = [x for x, r in zip(w, self.read_indices) if x >= 0 and r >= 0]
                if len(live) != len(set(live)):
                    raise ValueError("write_indices: duplicate live write slots")
        if self.scale is not None and not self.scale > 0:
            raise ValueError("scale: must be positive")
        return self

    @property
    def N(self) -> int:
        return len(self.seqlens)

    @property
    def HS(self) -> int:
        return max(self.H, self.HV)

    @property
    def T(self) -> int:
        """Token count of the built tensors' T axis."""
        return sum(self.seqlens) if self.op == "prefill" else self.seqlens[0]

    @property
    def B(self) -> int:
        return 1 if self.op == "prefill" else self.N

    @property
    def id(self) -> str:
        """Stable content hash (12 hex digits) of every field but ``name`` and ``tags``."""
        d = self.model_dump(exclude=_ID_EXCLUDE)
        d = {k: v for k, v in d.items() if k in _ID_V1 or v != type(self).model_fields[k].get_default(
            call_default_factory=True)}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def padded_rows(self) -> list[int]:
        if self.op == "prefill" and self.call and self.write_indices is not None:
            return []  # prefill with output_state_indices (call): read -1 starts from the zero state, not padding
        return [n for n, r in enumerate(self.read_indices or []) if r < 0]

    def repro(self, backend: str | None = None) -> str:
        """One-line command that reruns this case (on ``backend``: a name or ``module:factory`` spec)."""
        line = f"gdncheck repro '{self.model_dump_json(exclude_defaults=True)}'"
        return line + (f" --backend {backend}" if backend else "")
