"""Red zones: every buffer a backend receives sits inside a larger allocation whose guards it must not touch.

A write past the end of a pool, an output or a scratch buffer lands in memory gdncheck never
looks at (allocator slack, another tensor) and is invisible to the value contracts. Here each
tensor handed to a backend is a view into its own allocation::

    [ before guard | span of the view (holes of a strided view included) | after guard ]

filled with a sentinel bit pattern outside the view's elements, and after the call every
sentinel element must be bit-identical. Changed elements are reported per tensor, side
(``before``, ``after``, or ``hole`` for the elements between a strided view's rows) and first
offset.

Guard sizes: at least :data:`MIN_GUARD_BYTES` on each side, rounded up to :data:`ALIGN_BYTES` so
the view keeps the alignment of a fresh allocation; for the pool / state (and buffers adapters
allocate) whole rows of dim 0, at least one, so a write one slot past the pool or one slot before
it lands in a guard; for ``[B, T, ...]`` tensors at least one token (stride of dim 1, up to
:data:`MAX_ROW_GUARD_BYTES`), so a write one token past the output lands in a guard.

Sentinel: a *signalling* NaN per float dtype (quiet bit clear, payload 0xA5..): arithmetic in
IEEE hardware only produces quiet NaNs (CUDA's canonical 0x7FFFFFFF, x86's 0x7FC00000) and the
outputs' NaN poison is quiet too, so no computed value, poison or zero-fill equals it; a kernel
that reads a guard gets a NaN, which surfaces in the outputs. Integer tensors use bytes 0xA5
(a large negative index). The pattern is written and compared through an integer view, never
through float arithmetic (which could quiet it).

Input-only tensors (q, k, v, gates, indices, cu_seqlens) are guarded too, and after the call
:func:`inputs_changed` checks they are bit-identical to a copy taken before it.

Adapters that allocate buffers for a kernel (an ``output_state``, a scratch intermediate buffer,
a gathered initial state) call :func:`empty_guarded` / :func:`full_like_guarded`: inside a
:class:`RedZones` session (the runner opens one around each call) the buffer is guarded and
checked with the others; outside one it is a plain tensor.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import sys
from dataclasses import dataclass, fields

import torch

#: smallest guard on each side of a buffer, in bytes
MIN_GUARD_BYTES = 4096
#: guards keep the view's address a multiple of this (the CUDA caching allocator's alignment)
ALIGN_BYTES = 512
#: a non-pool tensor's row guard is capped here (its dim 0 may be the whole tensor)
MAX_ROW_GUARD_BYTES = 1 << 20

# Sentinel bit patterns, as the signed integers of the same width that view each dtype.
_SNAN = {
    torch.float32: (torch.int32, 0x7FA5A5A5),  # exponent all ones, quiet bit 22 clear, payload A5
    torch.float64: (torch.int64, 0x7FF4A5A5A5A5A5A5),  # quiet bit 51 clear
    torch.bfloat16: (torch.int16, 0x7FA5),  # quiet bit 6 clear, mantissa 0x25
    torch.float16: (torch.int16, 0x7DA5),  # quiet bit 9 clear, mantissa 0x1A5
}
_INT = {torch.int8: (torch.int8, 1), torch.uint8: (torch.uint8, 1), torch.int16: (torch.int16, 2),
        torch.int32: (torch.int32, 4), torch.int64: (torch.int64, 8), torch.bool: (torch.uint8, 1)}


def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >= 1 << (bits - 1) else v


def sentinel(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """``(integer view dtype, bit pattern as that integer)`` of ``dtype``'s guard sentinel."""
    if dtype in _SNAN:
        return _SNAN[dtype]
    if dtype in _INT:
        iv, n = _INT[dtype]
        pat = int.from_bytes(b"\xa5" * n, "little")
        return iv, pat if iv == torch.uint8 else _signed(pat, 8 * n)
    raise TypeError(f"red zones: no sentinel for {dtype}")


def _enabled() -> bool:
    return os.environ.get("GDNCHECK_REDZONE", "1") != "0"


def _announce() -> bool:
    """Print each guarded buffer's address range (the sanitizer's child maps addresses with them)."""
    return os.environ.get("GDNCHECK_REDZONE_ANNOUNCE") == "1"


@dataclass
class Violation:
    """Guard elements of one tensor that changed. ``offset`` is in elements: before the view it
    counts back from the first element (-1 = the element just before it); after it counts from
    one past the last (0 = the first element past the end); in a hole, from the view's start."""

    tensor: str
    side: str  # before | after | hole
    offset: int
    changed: int
    guard: int  # elements in that guard
    row: int | None = None  # the offset in rows of dim 0 (pools), when dim 0 has a stride
    value: str = ""  # the first changed element's bits, hex

    def __str__(self) -> str:
        where = f"first at offset {self.offset:+d} elements"
        if self.row is not None:
            where += f" (row {self.row:+d})"
        return (f"{self.tensor}: {self.side} guard changed: {self.changed} of {self.guard} elements, {where}, "
                f"bits {self.value}")


def _extent(t: torch.Tensor) -> int:
    """Elements of storage a view spans from its first element (0 for an empty view)."""
    if t.numel() == 0:
        return 0
    if any(s < 0 for s in t.stride()):
        raise ValueError("red zones: negative strides are not supported")
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


@dataclass
class _Zone:
    """One guarded allocation: ``flat`` = before guard + span + after guard; views into it."""

    name: str
    flat: torch.Tensor  # 1-D, the buffer's dtype
    pre: int
    span: int
    post: int
    row: int  # elements per row (stride of dim 0 of the first view), for reports
    holes: torch.Tensor | None  # bool [span]: True where no view has an element (strided views)

    def check(self) -> list[Violation]:
        iv, pat = sentinel(self.flat.dtype)
        bits = self.flat.view(iv)
        out = []
        for side, seg, base in (("before", bits[:self.pre], -self.pre),
                                ("after", bits[self.pre + self.span:], 0)):
            bad = seg != pat
            if bool(bad.any()):
                i = int(bad.to(torch.uint8).argmax())
                off = base + i
                out.append(self._violation(side, off, int(bad.sum()), seg.numel(), int(seg[i])))
        if self.holes is not None:
            mid = bits[self.pre:self.pre + self.span]
            bad = (mid != pat) & self.holes
            if bool(bad.any()):
                i = int(bad.to(torch.uint8).argmax())
                out.append(self._violation("hole", i, int(bad.sum()), int(self.holes.sum()), int(mid[i])))
        return out

    def _violation(self, side: str, off: int, n: int, size: int, raw: int) -> Violation:
        nbits = 8 * self.flat.element_size()
        row = math.floor(off / self.row) if self.row > 0 and side != "hole" else None
        return Violation(self.name, side, off, n, size, row, f"0x{raw & ((1 << nbits) - 1):0{nbits // 4}x}")

    def ranges(self) -> dict:
        """Addresses of the allocation and of the span between the guards (bytes)."""
        es = self.flat.element_size()
        lo = self.flat.data_ptr()
        return {"name": self.name, "alloc_lo": lo, "alloc_hi": lo + self.flat.numel() * es,
                "lo": lo + self.pre * es, "hi": lo + (self.pre + self.span) * es, "itemsize": es,
                "row_bytes": self.row * es, "dtype": str(self.flat.dtype).removeprefix("torch.")}


def _row(t: torch.Tensor, pool: bool) -> int:
    """Elements of one row: a pool slot (stride of dim 0) for pools and states; one token (stride
    of dim 1) for ``[B, T, ...]`` tensors of three or more dims; none for vectors and matrices."""
    if pool:
        return t.stride(0) if t.dim() else 0
    return t.stride(1) if t.dim() >= 3 else 0


def _guard_elems(row_elems: int, itemsize: int, *, whole_rows: bool) -> int:
    """Guard length in elements: >= MIN_GUARD_BYTES and >= one row (whole rows for pools),
    rounded up to ALIGN_BYTES."""
    align = max(1, ALIGN_BYTES // itemsize)
    need = max(MIN_GUARD_BYTES // itemsize, 1)
    if whole_rows and row_elems > 0:
        n = max(row_elems * -(-need // row_elems), row_elems)
    else:
        n = max(need, min(row_elems, MAX_ROW_GUARD_BYTES // itemsize))
    return -(-n // align) * align


class RedZones:
    """A session of guarded buffers: :meth:`guard_inputs` and :func:`empty_guarded` add to it,
    :meth:`check` reports every changed guard. Use as a context manager to make it the session
    adapters' helpers register with."""

    # tensors whose dim 0 is a pool slot (or a sequence's state): guarded with whole rows
    POOL_LIKE = ("state",)

    def __init__(self, device: str | torch.device | None = None):
        self.device = device
        self.zones: list[_Zone] = []
        self._token = None

    def __enter__(self) -> "RedZones":
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)

    # ---------------------------------------------------------------- allocation

    def guarded_copy(self, name: str, tensors: list[torch.Tensor], device=None,
                     whole_rows: bool = False) -> list[torch.Tensor]:
        """Copies of ``tensors`` (views of one storage, e.g. a and b cut from one projection)
        inside one guarded allocation on ``device``, at the same relative offsets and strides."""
        dev = torch.device(device) if device is not None else tensors[0].device
        dtype = tensors[0].dtype
        offs = [t.storage_offset() for t in tensors]
        lo = min(offs)
        span = max(o + _extent(t) for o, t in zip(offs, tensors)) - lo
        first = tensors[0]
        row = _row(first, whole_rows)
        g = _guard_elems(row, first.element_size(), whole_rows=whole_rows)
        flat = torch.empty(g + span + g, dtype=dtype, device=dev)
        iv, pat = sentinel(dtype)
        holey = sum(t.numel() for t in tensors) < span  # strided views leave holes in their span
        if holey:
            flat.view(iv).fill_(pat)
        else:  # the copy below overwrites the span: the guards alone (one pass less over a big pool)
            flat[:g].view(iv).fill_(pat)
            flat[g + span:].view(iv).fill_(pat)
        views = [torch.as_strided(flat, t.shape, t.stride(), g + o - lo) for o, t in zip(offs, tensors)]
        for v, t in zip(views, tensors):
            v.copy_(t)
        holes = None
        if holey:
            cover = torch.zeros(span, dtype=torch.bool, device=dev)
            for o, t in zip(offs, tensors):
                torch.as_strided(cover, t.shape, t.stride(), o - lo).fill_(True)
            holes = ~cover
        z = _Zone(name, flat, g, span, g, row, holes)
        self.zones.append(z)
        if _announce():
            print("GDNCHECK-BUFFER " + json.dumps(z.ranges()), flush=True)
        return views

    def empty(self, name: str, shape, dtype: torch.dtype, device, *, fill: float | None = None,
              whole_rows: bool = True) -> torch.Tensor:
        """A contiguous ``shape`` buffer inside guards; ``fill`` (e.g. NaN) or uninitialised."""
        t = torch.empty(shape, dtype=dtype, device="meta")
        dev = torch.device(device)
        row = _row(t, whole_rows)
        es = t.element_size()
        g = _guard_elems(row, es, whole_rows=whole_rows)
        span = t.numel()
        flat = torch.empty(g + span + g, dtype=dtype, device=dev)
        iv, pat = sentinel(dtype)
        flat[:g].view(iv).fill_(pat)
        flat[g + span:].view(iv).fill_(pat)
        view = torch.as_strided(flat, t.shape, t.stride(), g)
        if fill is not None:
            view.fill_(fill)
        z = _Zone(name, flat, g, span, g, row, None)
        self.zones.append(z)
        if _announce():
            print("GDNCHECK-BUFFER " + json.dumps(z.ranges()), flush=True)
        return view

    def guard_inputs(self, inputs, device=None):
        """A copy of ``inputs`` (:class:`~gdncheck.cases.Inputs`) on ``device`` whose tensors are
        views into guarded allocations; views sharing a storage (strided a/b) share one."""
        src = {f.name: getattr(inputs, f.name) for f in fields(inputs)}
        tensors = {k: v for k, v in src.items() if isinstance(v, torch.Tensor)}
        groups: dict[tuple, list[str]] = {}
        for k, t in tensors.items():
            key = (t.device, t.untyped_storage().data_ptr(), t.dtype) if t.numel() else (k,)
            groups.setdefault(key, []).append(k)
        out = dict(src)
        for names in groups.values():
            views = self.guarded_copy("+".join(names), [tensors[n] for n in names], device,
                                      whole_rows=any(n in self.POOL_LIKE for n in names))
            out.update(zip(names, views))
        return type(inputs)(**out)

    # ---------------------------------------------------------------- checks

    def check(self) -> list[Violation]:
        """Every changed guard element, first offset per tensor and side."""
        out: list[Violation] = []
        for z in self.zones:
            out += z.check()
        return out

    def ranges(self) -> list[dict]:
        return [z.ranges() for z in self.zones]

    def overhead_bytes(self) -> int:
        """Bytes allocated beyond the views' own spans (guards and holes)."""
        return sum((z.pre + z.post) * z.flat.element_size() for z in self.zones)


_ACTIVE: contextvars.ContextVar[RedZones | None] = contextvars.ContextVar("gdncheck_redzones", default=None)


def active() -> RedZones | None:
    """The session of the call in progress (None outside a run, or with red zones off)."""
    return _ACTIVE.get()


def empty_guarded(name: str, shape, dtype: torch.dtype, device, *, fill: float | None = None) -> torch.Tensor:
    """For adapters: a buffer the kernel writes (``output_state``, a scratch intermediate buffer,
    a gathered ``h0``), guarded and checked after the call when a session is active; else a
    plain ``torch.empty`` / ``torch.full``. ``name`` appears in violations."""
    rz = active()
    if rz is None:
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(fill) if fill is not None else t
    return rz.empty(name, shape, dtype, device, fill=fill)


def full_like_guarded(t: torch.Tensor, fill: float, name: str) -> torch.Tensor:
    """:func:`empty_guarded` shaped like ``t`` (contiguous), filled with ``fill``."""
    return empty_guarded(name, tuple(t.shape), t.dtype, t.device, fill=fill)


@contextlib.contextmanager
def session(inputs, device=None):
    """``with session(inputs, dev) as (rz, guarded):`` guarded copy of ``inputs``; with red zones
    off (``GDNCHECK_REDZONE=0``) a plain :meth:`Inputs.clone` and ``rz = None``."""
    if not _enabled():
        yield None, inputs.clone(device)
        return
    rz = RedZones(device)
    with rz:
        yield rz, rz.guard_inputs(inputs, device)


# Tensors a backend reads only: any change is a write into its inputs.
INPUT_ONLY = ("q", "k", "v", "A_log", "dt_bias", "a", "b", "g", "beta", "cu_seqlens", "read_indices",
              "write_indices")


def inputs_changed(before, after) -> list[str]:
    """Input-only tensors of ``after`` that are not bit-identical to ``before`` (both
    :class:`~gdncheck.cases.Inputs`), with the count and first flat index of changed elements."""
    out = []
    for name in INPUT_ONLY:
        a, b = getattr(after, name, None), getattr(before, name, None)
        if a is None or b is None or a.numel() == 0:
            continue
        b = b.to(a.device)
        if a.dtype in _SNAN:
            iv = _SNAN[a.dtype][0]
            diff = a.contiguous().view(iv) != b.contiguous().view(iv)
        else:
            diff = a != b
        if bool(diff.any()):
            flat = diff.reshape(-1)
            i = int(flat.to(torch.uint8).argmax())
            out.append(f"{name}: {int(flat.sum())} of {flat.numel()} elements changed by the call, "
                       f"first at flat index {i}")
    return out


def print_ranges(rz: RedZones | None, file=sys.stdout) -> None:
    """One ``GDNCHECK-BUFFER {json}`` line per guarded allocation."""
    for r in (rz.ranges() if rz is not None else []):
        print("GDNCHECK-BUFFER " + json.dumps(r), file=file, flush=True)


def violations(rz: RedZones | None, before, after) -> tuple[list[str], list[str]]:
    """``(changed guards, changed input-only tensors)`` of one call, as report lines."""
    guards = [str(v) for v in rz.check()] if rz is not None else []
    return guards, inputs_changed(before, after)


def record(contracts, guards: list[str], changed_inputs: list[str]) -> None:
    """Put :func:`violations` into a :class:`~gdncheck.data.results.Contracts` (hard contracts)."""
    contracts.redzone = list(guards)
    contracts.inputs_modified = list(changed_inputs)
    contracts.details += [f"red zone: {g}" for g in guards[:4]]
    contracts.details += [f"input written: {c}" for c in changed_inputs[:4]]
