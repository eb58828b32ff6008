"""Cases: a declarative description of one kernel call, and its deterministic materialisation.

A :class:`Case` names everything a call depends on; :func:`materialize` builds its tensors from
``case.seed`` with a CPU generator (pools of more than :data:`HASHED_POOL_ELEMENTS` elements from
a counter-based hash on the target device), so a case id gives bit-identical inputs on any machine.

Token layout of the built tensors (``HS = max(H, HV)``)::

    prefill  packed varlen: B = 1, T = sum(seqlens), cu_seqlens [N + 1]
    decode   B = N, T = 1
    verify   B = N, T = seqlens[0] (all equal, >= 2), intermediate states per token
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gdncheck_reference import compute_gates, head_dims

Op = Literal["prefill", "decode", "verify"]
DType = Literal["bfloat16", "float16", "float32"]
GateDist = Literal["model", "alpha_one", "alpha_tiny", "softplus_high", "softplus_low", "beta_zero", "beta_one",
                   # edges (see gdncheck/edges.py): a + dt_bias and b far past every fp32/bf16 overflow point
                   "softplus_huge", "softplus_huge_neg", "beta_logit_huge", "decay_underflow"]
Padding = Literal["skip", "null_slot", "caller_value"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ID_EXCLUDE = {"name", "tags"}
# Fields added after the first release of case ids: hashed only when they differ from their default,
# so every case written before them keeps its id (baseline results are keyed by it).
_ID_LATE = ("call", "value_edge")
ValueEdge = Literal["qk_zero", "qk_tiny", "v_huge", "v_subnormal", "poison_padding"]


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
        head_dims(self.H, self.HV)
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
        for f in _ID_LATE:
            if d[f] == Case.model_fields[f].get_default(call_default_factory=True):
                del d[f]
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def padded_rows(self) -> list[int]:
        if self.op == "prefill" and self.call and self.write_indices is not None:
            return []  # prefill with output_state_indices (call): read -1 starts from the zero state, not padding
        return [n for n, r in enumerate(self.read_indices or []) if r < 0]

    def repro(self) -> str:
        """One-line command that reruns this case."""
        return f"gdncheck repro '{self.model_dump_json(exclude_defaults=True)}'"


@dataclass
class Inputs:
    """Tensors of one call, on one device. ``HS = max(H, HV)``; states in ``case.layout``.

    Attributes:
        q, k: ``[B, T, H, K]`` case.dtype.   v: ``[B, T, HV, V]`` case.dtype.
        A_log: ``[HS]`` fp32. dt_bias: ``[HS]`` fp32. a, b: ``[B, T, HS]`` case.gate_dtype
            (strided views when ``case.gate_strided``).
        g: ``[B, T, HS]`` fp32 log decay and beta ``[B, T, HS]`` fp32, precomputed from the raw
            gates in float64 then rounded once to fp32.
        cu_seqlens: ``[N + 1]`` int32 for prefill, else None.
        state: pool ``[P, HS, ...]`` (with indices) or initial state ``[N, HS, ...]``, case.state_dtype.
        read_indices, write_indices: ``[N]`` int32 or None.
        out: ``[B, T, HS, V]`` case.dtype, NaN-poisoned output buffer.
        intermediate: ``[B, T, HS, ...]`` fp32 NaN-poisoned buffer (verify with intermediate) or None.
    """

    case: Case
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    cu_seqlens: torch.Tensor | None
    state: torch.Tensor
    read_indices: torch.Tensor | None
    write_indices: torch.Tensor | None
    out: torch.Tensor
    intermediate: torch.Tensor | None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "case" and isinstance(getattr(self, f.name), torch.Tensor)}

    def clone(self, device: str | torch.device | None = None) -> "Inputs":
        """Deep copy, on ``device`` if given, that keeps each tensor's strides (strided views stay strided)."""
        def cp(t):
            if not isinstance(t, torch.Tensor):
                return t
            buf = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device or t.device)
            buf.copy_(t)
            return buf
        return Inputs(**{f.name: cp(getattr(self, f.name)) for f in fields(self)})


def _raw_gates(case: Case, gen: torch.Generator, B: int, T: int):
    HS = case.HS
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    d = case.gate_dist
    A_log = torch.log(1 + 15 * u(HS))
    dt_bias = torch.log(torch.expm1(0.001 + 0.099 * u(HS)))
    a, b = n(B, T, HS), n(B, T, HS)
    if d == "alpha_one":
        A_log = torch.full((HS,), -8.0, dtype=torch.float64) - u(HS)
    elif d == "alpha_tiny":  # g ~ -21: alpha ~ 1e-9
        A_log, dt_bias, a = torch.full((HS,), float(torch.log(torch.tensor(16.0)))), torch.zeros(HS), 1.0 + 0.1 * u(B, T, HS)
    elif d == "softplus_high":  # a + dt_bias on both sides of the threshold 20, far past it
        A_log, dt_bias, a = -4.0 - u(HS), torch.zeros(HS), 10.0 + 30.0 * u(B, T, HS)
    elif d == "softplus_low":
        dt_bias, a = torch.zeros(HS), -40.0 + 25.0 * u(B, T, HS)
    elif d == "beta_zero":
        b = -20.0 - u(B, T, HS)
    elif d == "beta_one":
        b = 20.0 + u(B, T, HS)
    elif d in ("softplus_huge", "softplus_huge_neg", "beta_logit_huge", "decay_underflow"):
        from gdncheck.edges import edge_gates
        A_log, dt_bias, a, b = edge_gates(d, A_log, dt_bias, a, b, u)
    return A_log, dt_bias, a, b


# Pools above this many elements (float64 copies past 1 GiB: cases only a GPU runs) are drawn by
# :func:`hashed_normal` on the target device: the CPU generator draws 10^8 normals per second on
# one core, 15 s for the 4100-slot pool that crosses 2^31 elements, in every backend's worker.
HASHED_POOL_ELEMENTS = 1 << 27

_MIX = (-7046029254386353131, -4658895280553007687, -7723592293110705685)  # splitmix64, as int64
_CHUNK = 1 << 24


def _lsr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (``>>`` on int64 tensors is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def hashed_normal(n: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """``n`` float32 values of mean 0 and variance 1, element ``i`` a function of ``(seed, i)`` only.

    splitmix64 of the element index, its four 16-bit fields summed (Irwin-Hall: near-normal,
    bounded at +-3.46), one int-to-float conversion and one float32 multiply: integer arithmetic
    and a correctly rounded product, so CPU and CUDA give the same bits at any chunking.
    """
    dev = torch.device(device)
    out = torch.empty(n, dtype=torch.float32, device=dev)
    inv_std = float(torch.tensor((3.0 / (65536.0 ** 2 - 1)) ** 0.5, dtype=torch.float32))
    base = (seed + 1) * 0x632BE59BD9B4E019 % (1 << 64)
    base -= (1 << 64) * (base >= 1 << 63)
    for lo in range(0, n, _CHUNK):
        z = torch.arange(lo + 1, min(n, lo + _CHUNK) + 1, dtype=torch.int64, device=dev) * _MIX[0] + base
        z = (z ^ _lsr(z, 30)) * _MIX[1]
        z = (z ^ _lsr(z, 27)) * _MIX[2]
        z = z ^ _lsr(z, 31)
        s = (z & 0xFFFF) + _lsr(z, 16) % 65536 + _lsr(z, 32) % 65536 + _lsr(z, 48)
        out[lo:lo + z.numel()] = (s - 131070).to(torch.float32) * inv_std
    return out


def materialize(case: Case, device: str | torch.device = "cpu") -> Inputs:
    """Build the inputs of ``case`` deterministically from ``case.seed`` (CPU generator).

    Tensors are drawn on the CPU in a fixed order and then moved; strided views are cut on the
    target device so their strides survive. Output buffers are NaN-poisoned.
    """
    gen = torch.Generator(device="cpu").manual_seed(case.seed)
    B, T, H, HV, HS, K, V, N = case.B, case.T, case.H, case.HV, case.HS, case.K, case.V, case.N
    dt, sdt, gdt = DTYPES[case.dtype], DTYPES[case.state_dtype], DTYPES[case.gate_dtype]
    q = (torch.randn(B, T, H, K, generator=gen) * case.qk_scale).to(dt)
    k = (torch.randn(B, T, H, K, generator=gen) * case.qk_scale).to(dt)
    v = (torch.randn(B, T, HV, V, generator=gen) * case.v_scale).to(dt)
    if case.value_edge is not None:
        from gdncheck.edges import edge_values
        q, k, v = edge_values(case, q, k, v)
    A_log, dt_bias, a, b = _raw_gates(case, gen, B, T)
    A_log, dt_bias = A_log.to(torch.float32), dt_bias.to(torch.float32)
    a, b = a.to(gdt), b.to(gdt)
    # Precomputed gates from the raw inputs as the kernel sees them, rounded once to fp32.
    g64, _, beta64 = compute_gates(A_log, a, dt_bias, b)
    g, beta = g64.to(torch.float32), beta64.to(torch.float32)
    sshape = (HS, K, V) if case.layout == "v_last" else (HS, V, K)
    rows = case.pool_size if case.pool_size is not None else N
    if rows * HS * K * V > HASHED_POOL_ELEMENTS:  # the last draw: nothing after it moves
        state = hashed_normal(rows * HS * K * V, case.seed, device).view(rows, *sshape)
        state = state.mul_(float(torch.tensor(case.state_scale, dtype=torch.float32))).to(sdt)
    else:
        state = (torch.randn(rows, *sshape, generator=gen) * case.state_scale).to(sdt)
    cu = None
    if case.op == "prefill":
        cu = torch.tensor([0] + torch.tensor(case.seqlens).cumsum(0).tolist(), dtype=torch.int32)
    ri = torch.tensor(case.read_indices, dtype=torch.int32) if case.read_indices is not None else None
    wi = torch.tensor(case.write_indices, dtype=torch.int32) if case.write_indices is not None else None

    dev = torch.device(device)
    q, k, v, A_log, dt_bias, g, beta = (t.to(dev) for t in (q, k, v, A_log, dt_bias, g, beta))
    if case.gate_strided:  # one projection output [B, T, 2*HS + 8]; a and b are column slices
        proj = torch.zeros(B, T, 2 * HS + 8, dtype=gdt, device=dev)
        proj[..., 4:4 + HS], proj[..., 8 + HS:8 + 2 * HS] = a.to(dev), b.to(dev)
        a, b = proj[..., 4:4 + HS], proj[..., 8 + HS:8 + 2 * HS]
    else:
        a, b = a.to(dev), b.to(dev)
    if case.pool_strided:  # slot stride = 2 slots, as in a layer-interleaved pool
        base = torch.zeros(rows, 2, *sshape, dtype=sdt, device=dev)
        base[:, 1] = state.to(dev)
        state = base[:, 1]
    else:
        state = state.to(dev)
    cu = cu.to(dev) if cu is not None else None
    ri = ri.to(dev) if ri is not None else None
    wi = wi.to(dev) if wi is not None else None
    out = torch.full((B, T, HS, V), float("nan"), dtype=dt, device=dev)
    inter = None
    if case.intermediate:
        inter = torch.full((B, T, *sshape), float("nan"), dtype=torch.float32, device=dev)
    res = Inputs(case=case, q=q, k=k, v=v, A_log=A_log, dt_bias=dt_bias, a=a, b=b, g=g, beta=beta,
                 cu_seqlens=cu, state=state, read_indices=ri, write_indices=wi, out=out, intermediate=inter)
    if case.value_edge == "poison_padding":
        from gdncheck.edges import poison_padding
        poison_padding(case, res)
    return res


def inputs_digest(inputs: Inputs) -> str:
    """sha256 (16 hex) over every input tensor's name, dtype, shape and bytes (CPU copies)."""
    h = hashlib.sha256()
    for name, t in sorted(inputs.tensors().items()):
        c = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{c.dtype}:{tuple(c.shape)}".encode())
        h.update(c.view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- suites (TOML)

class SuiteError(ValueError):
    """A suite file is malformed: names the file, the key or line, and what was expected."""


def suites_dir() -> Path:
    return Path(str(resources.files("gdncheck_cases")))


def list_suites() -> list[str]:
    return sorted(p.stem for p in suites_dir().glob("*.toml"))


_SUGAR = ("matrix", "vars", "batch", "seqlen", "slots")
_SLOT_KEYS = {"first", "step", "reverse", "pad", "pad_every", "pad_tail", "free"}


def _merge(e: dict, key: str, v) -> dict:
    """One matrix value into an entry: a table merges its keys (``tags`` append, ``vars`` merge)."""
    if not isinstance(v, dict):
        return {**e, key: v}
    e = dict(e)
    for k, x in v.items():
        if k == "tags":
            e["tags"] = list(e.get("tags", [])) + list(x)
        elif k == "vars":
            e["vars"] = {**e.get("vars", {}), **x}
        else:
            e[k] = x
    return e


def _slots(spec: dict, N: int) -> tuple[list[int], int]:
    """``slots`` sugar -> (read_indices, minimal pool size).

    Keys: ``first`` (1: slot 0 stays the reserved dummy), ``step`` (1), ``reverse`` (false),
    ``pad`` (row numbers padded with -1), ``pad_every`` (every k-th row padded), ``pad_tail``
    (last rows padded, as a CUDA-graph bucket), ``free`` (extra unused slots).
    """
    bad = set(spec) - _SLOT_KEYS
    if bad:
        raise SuiteError(f"slots: unknown key(s) {sorted(bad)}; expected {sorted(_SLOT_KEYS)}")
    first, step, free = int(spec.get("first", 1)), int(spec.get("step", 1)), int(spec.get("free", 0))
    if first < 0 or step < 1 or free < 0:
        raise SuiteError("slots: expected first >= 0, step >= 1, free >= 0")
    pad = set(spec.get("pad", []))
    k = int(spec.get("pad_every", 0))
    if k > 0:
        pad |= {n for n in range(N) if n % k == k - 1}
    pad |= set(range(N - int(spec.get("pad_tail", 0)), N))
    slots = [first + n * step for n in range(N)]
    if spec.get("reverse", False):
        slots.reverse()
    read = [-1 if n in pad else s for n, s in enumerate(slots)]
    return read, first + N * step + free


def _finish(e: dict) -> dict:
    """Resolve the sugar keys of one expanded entry and fill ``{placeholders}`` in name and tags.

    ``batch`` + ``seqlen`` -> ``seqlens = [seqlen] * batch``; ``slots`` -> ``read_indices`` (and
    ``pool_size`` unless given); ``vars`` only feed the placeholders. Placeholders see the
    entry's fields, its ``vars``, ``N``, ``T`` (tokens per row or in all) and ``tokens``.
    """
    e = dict(e)
    var = e.pop("vars", {}) or {}
    if "batch" in e:
        if "seqlens" in e:
            raise SuiteError("batch: give either batch (+ seqlen) or seqlens, not both")
        e["seqlens"] = [int(e.pop("seqlen", 1))] * int(e.pop("batch"))
    elif "seqlen" in e:
        raise SuiteError("seqlen: needs batch")
    if "slots" in e:
        if "read_indices" in e:
            raise SuiteError("slots: give either slots or read_indices, not both")
        spec = e.pop("slots")
        if not isinstance(spec, dict):
            raise SuiteError(f"slots: expected a table, got {type(spec).__name__}")
        e["read_indices"], need = _slots(spec, len(e.get("seqlens", [])))
        e.setdefault("pool_size", need)
    lens = e.get("seqlens") or [0]
    ctx = {**e, **var, "N": len(lens), "tokens": sum(lens),
           "T": sum(lens) if e.get("op") == "prefill" else lens[0]}
    try:
        if isinstance(e.get("name"), str):
            e["name"] = e["name"].format_map(ctx)
        if "tags" in e:
            e["tags"] = [t.format_map(ctx) if isinstance(t, str) else t for t in e["tags"]]
    except (KeyError, ValueError, IndexError) as err:
        raise SuiteError(f"name/tags: bad placeholder {err}; known: {sorted(ctx)}") from None
    return e


def _expand(entry: dict, axes: dict | None = None) -> list[dict]:
    """A ``[[case]]`` table whose ``matrix`` keys expand to their product.

    A matrix value is a list of values for that key, a list of tables (each merged into the
    entry: coupled keys such as ``H``/``HV``) or the name of a list under top-level ``axes``.
    """
    entry = dict(entry)
    matrix = entry.pop("matrix", None) or {}
    if not isinstance(matrix, dict):
        raise SuiteError(f"matrix: expected a table of key -> list, got {type(matrix).__name__}")
    out = [entry]
    for key, vals in matrix.items():
        if isinstance(vals, str):
            if vals not in (axes or {}):
                raise SuiteError(f"matrix.{key}: unknown axis {vals!r}; defined axes: {sorted(axes or {})}")
            vals = axes[vals]
        if not isinstance(vals, list):
            raise SuiteError(f"matrix.{key}: expected a list of values or an axis name, got {type(vals).__name__}")
        out = [_merge(e, key, v) for e in out for v in vals]
    return [_finish(e) for e in out]


def _case_lines(text: str) -> list[int]:
    """1-based line of each ``[[case]]`` header."""
    return [i for i, ln in enumerate(text.splitlines(), 1) if ln.strip().startswith("[[case]]")]


def _key_line(text: str, start: int, key: str) -> int | None:
    """Line of ``key =`` in the table starting at line ``start`` (None if not written there)."""
    lines = text.splitlines()
    for i in range(start, len(lines)):
        ln = lines[i].strip()
        if ln.startswith("["):
            break
        if ln.split("=", 1)[0].strip().strip('"') == key or f" {key} =" in ln or f"{{{key} =" in ln:
            return i + 1
    return None


def _describe(err: ValidationError) -> tuple[str, str]:
    """(key, what was expected) of a pydantic error, in suite-file words."""
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "case"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        import difflib
        known = list(Case.model_fields) + list(_SUGAR)
        near = difflib.get_close_matches(str(first["loc"][0]), known, n=1)
        msg = "unknown key" + (f" (did you mean '{near[0]}'?)" if near else "") + \
            f"; expected one of {', '.join(known)}"
    elif first["type"] == "value_error" and msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if ":" in msg.split(" ")[0]:  # the model's own checks name their key first
            loc, _, msg = msg.partition(": ")
    return loc, msg


def load_suite_file(path: str | Path) -> list[Case]:
    """Read a suite TOML file: ``description``, ``axes``, ``[defaults]`` and ``[[case]]`` tables."""
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f"{path}: malformed TOML: {e}") from None
    except OSError as e:
        raise SuiteError(f"{path}: cannot read: {e.strerror}") from None
    unknown = set(data) - {"defaults", "case", "description", "axes"}
    if unknown:
        raise SuiteError(f"{path}: unknown top-level key(s) {sorted(unknown)}; "
                         "expected description, axes, [defaults], [[case]]")
    defaults, axes = data.get("defaults", {}), data.get("axes", {})
    headers = _case_lines(text)
    cases: list[Case] = []
    for i, entry in enumerate(data.get("case", [])):
        line = headers[i] if i < len(headers) else None
        where = f"{path}:{line}" if line else str(path)
        label = f"case #{i} ({entry.get('name', '?')})"
        try:
            expanded = _expand({**defaults, **entry}, axes)
        except SuiteError as e:
            raise SuiteError(f"{where}: {label}: {e}") from None
        for e in expanded:
            try:
                cases.append(Case(**e))
            except ValidationError as err:
                key, msg = _describe(err)
                kl = _key_line(text, line, key.split(".")[0]) if line else None
                at = f"{path}:{kl}" if kl else where
                raise SuiteError(f"{at}: {label}: key '{key}': {msg}") from None
    return cases


def load_suite(name_or_path: str) -> list[Case]:
    """A suite by name (``smoke``, ``models``, ``edges``, ...) or by path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return load_suite_file(p)
    f = suites_dir() / f"{name_or_path}.toml"
    if not f.exists():
        raise SuiteError(f"suite {name_or_path!r}: not found; known suites: {', '.join(list_suites())}")
    return load_suite_file(f)
