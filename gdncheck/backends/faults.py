"""Planted-fault backends: the clean FlashInfer twin with exactly one bug each.

They exist to prove that the gate catches the bugs users met in this family (-1 padding into a live slot, int32 offsets past slot 4096, uncached intermediates, ...):
each fault in :data:`FAULTS` must turn at least one case of :func:`fault_cases` red, while the
clean twin (:func:`clean_twin`) passes them all. Every fault overrides one hook of
:class:`~gdncheck.backends.twins._Twin` (or one knob), so the difference from the clean twin
is exactly the planted bug.
"""
from __future__ import annotations

from typing import Callable

import torch

from gdncheck.backends.base import Backend
from gdncheck.backends.twins import FlashInferTwin, Plan
from gdncheck.data.case import Case
from gdncheck.inputs import Inputs


def clean_twin() -> FlashInferTwin:
    """The clean twin every fault is built on."""
    return FlashInferTwin()


class _Fault(FlashInferTwin):
    family = "fault"
    fault = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.name = f"fault-{cls.fault}"


class PaddingRowWritten(_Fault):
    """Padded rows (index -1) are clamped to slot 0 and read/write it like a live row; mirrors
    SGLang's -1 padding clamped to 0 that overwrote a live slot."""

    fault = "padding_row_written"

    def _plan(self, inputs: Inputs, policy: str) -> Plan:
        p = super()._plan(inputs, policy)
        for n, pad in enumerate(p.padded):
            if pad:
                p.src[n] = 0
                p.dst[n] = None if inputs.case.disable_state_update else 0
                p.padded[n] = False
        return p


class UntouchedRowModified(_Fault):
    """The first written state is also stored into the next pool slot that no index names;
    mirrors an off-by-one slot write-back that corrupts another request's state."""

    fault = "untouched_row_modified"

    def _after(self, inputs: Inputs, pool: torch.Tensor, plan: Plan, S: torch.Tensor) -> None:
        c = inputs.case
        if c.pool_size is None:
            return
        named = set(inputs.read_indices.tolist())
        if inputs.write_indices is not None:
            named |= set(inputs.write_indices.tolist())
        named.add(0)  # slot 0 may be a null slot; pick a row that is unambiguously untouched
        wn = [n for n, d in enumerate(plan.dst) if d is not None]
        if not wn:
            return
        d = plan.dst[wn[0]]
        free = [r for r in range(d + 1, c.pool_size) if r not in named] + \
               [r for r in range(1, d) if r not in named]
        if free:
            pool[free[0]] = pool[self._slot(c, d)]


class BetaNotSigmoided(_Fault):
    """The raw-gate path uses b itself as beta (sigmoid missing); mirrors a kernel fed raw b
    where it expects post-sigmoid beta (use_beta_sigmoid_in_kernel mismatch)."""

    fault = "beta_not_sigmoided"

    def _beta_from_raw(self, b: torch.Tensor) -> torch.Tensor:
        return b


class BetaRounded(_Fault):
    """beta rounded to bf16 where the family keeps it fp32; mirrors SGLang's beta quantisation
    (0.26% argmax flips in a K-last verify ablation)."""

    fault = "beta_rounded"

    def __init__(self, **kw):
        super().__init__(**{**kw, "beta_dtype": "bfloat16"})


class ExpBf16(_Fault):
    """exp(g) evaluated in bf16; mirrors the FlashInfer-extend path that took exp before
    casting g to fp32."""

    fault = "exp_bf16"

    def __init__(self, **kw):
        super().__init__(**{**kw, "exp_dtype": "bfloat16"})


class L2NormMissing(_Fault):
    """q/k not L2-normalised although the call asks for it; mirrors an adapter dropping
    use_qk_l2norm_in_kernel."""

    fault = "l2norm_missing"

    def _l2norm(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LayoutTransposed(_Fault):
    """Final states written in the other layout (last two dims swapped in memory); mirrors the
    dropped K-last/V-last transpose in SGLang's verify."""

    fault = "layout_transposed"

    def _store_states(self, pool: torch.Tensor, rows: list[int], S: torch.Tensor) -> None:
        # the other layout's memory order reinterpreted in this one (a view when K == V)
        wrong = S.transpose(-1, -2).contiguous().view(S.shape)
        super()._store_states(pool, rows, wrong)


class CuSeqlensOffByOne(_Fault):
    """Prefill sequence n runs over tokens cu[n] .. cu[n+1] inclusive (one past its end);
    mirrors an off-by-one in varlen boundary handling."""

    fault = "cu_seqlens_off_by_one"

    def _plan(self, inputs: Inputs, policy: str) -> Plan:
        p = super()._plan(inputs, policy)
        if inputs.case.op == "prefill":
            total = inputs.case.T
            p.lens = [min(n + 1, total - s) for s, n in zip(p.starts, p.lens)]
        return p


class FinalStateNotWritten(_Fault):
    """Final states are never stored into the pool / output state; mirrors an engine path that
    forgets output_final_state or the write-back."""

    fault = "final_state_not_written"

    def _store_states(self, pool: torch.Tensor, rows: list[int], S: torch.Tensor) -> None:
        return None


class LastTokenNotWritten(_Fault):
    """The last token of each sequence keeps the caller's (poisoned) output; mirrors a launch
    grid one block short."""

    fault = "last_token_not_written"

    def _out_mask(self, plan: Plan, BT: int, policy: str) -> torch.Tensor:
        m = super()._out_mask(plan, BT, policy)
        for s, n in zip(plan.starts, plan.lens):
            if n:
                m[s + n - 1] = False
        return m


class GvaMappingWrong(_Fault):
    """Value head i reads q/k head i % H instead of i // (HV / H); mirrors a GVA head mapping
    written for interleaved instead of grouped heads."""

    fault = "gva_mapping_wrong"

    def _qk_head_index(self, H: int, HS: int) -> torch.Tensor:
        return torch.arange(HS) % H


class Int32OffsetWrap(_Fault):
    """Slot offsets computed in int32 wrap once slot * HV * V * K reaches 2**31; mirrors the
    overflow at slot 4096 with HV = 32, K = V = 128.

    Emulation: the element stride is taken as ``HV * max(V, 128) * max(K, 128)`` (the model's
    K = V = 128 even when the case is smaller, to keep the pool cheap) and the slot becomes
    ``slot % (2**31 // stride)``: slot 4096 + i aliases slot i at HV = 32. A real kernel's
    signed offset goes negative instead (an out-of-bounds access: garbage or a fault); the
    emulation turns that into aliasing onto a live slot, which is observable and deterministic.
    """

    fault = "int32_offset_wrap"

    def _slot(self, case: Case, slot: int) -> int:
        stride = case.HS * max(case.V, 128) * max(case.K, 128)
        return slot % (2 ** 31 // stride)


class ChunkBoundaryError(_Fault):
    """The state carried into the next chunk is decayed through token 62 of the chunk, not 63
    (the last token's decay is dropped); mirrors an off-by-one in the chunk-local cumsum."""

    fault = "chunk_boundary_error"

    def _chunk_end_decay(self, Gc: torch.Tensor) -> torch.Tensor:
        return Gc[..., -2]


class IntermediateNotCached(_Fault):
    """Verify does not write per-token intermediate states; mirrors the fused verify that
    skipped intermediate caching (GSM8K 0.83 -> 0.35)."""

    fault = "intermediate_not_cached"

    def _store_intermediate(self, buf: torch.Tensor, inter: torch.Tensor, layout: str) -> None:
        return None


class PoolRowPastEnd(_Fault):
    """After the pool writes, the last written state is also stored one row past the pool's last
    slot (``pool[P]``); mirrors a slot index computed one too high (or a scratch buffer sized by
    sequence count but indexed by slot) writing outside the allocation.

    Every row the call may touch stays right, so only a red zone sees it: the row past the end
    is reached through the pool's storage, which under red zones is the guard after the pool.
    Without room in the storage (a plain allocation) the write is skipped, as a real kernel's
    would land unseen in allocator slack or another tensor.
    """

    fault = "pool_row_past_end"

    def _after(self, inputs: Inputs, pool: torch.Tensor, plan: Plan, S: torch.Tensor) -> None:
        c = inputs.case
        wn = [d for d in plan.dst if d is not None]
        if c.pool_size is None or not wn or pool is not inputs.state:
            return
        off = pool.storage_offset() + pool.shape[0] * pool.stride(0)
        need = (off + _span(pool[0])) * pool.element_size()
        if need > pool.untyped_storage().nbytes():
            return
        past = torch.as_strided(pool, pool.shape[1:], pool.stride()[1:], off)
        past.copy_(pool[self._slot(c, wn[-1])])


def _span(t: torch.Tensor) -> int:
    """Elements of storage a non-empty view spans from its first element."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


_CLASSES = [PaddingRowWritten, UntouchedRowModified, BetaNotSigmoided, BetaRounded, ExpBf16,
            L2NormMissing, LayoutTransposed, CuSeqlensOffByOne, FinalStateNotWritten,
            LastTokenNotWritten, GvaMappingWrong, Int32OffsetWrap, ChunkBoundaryError,
            IntermediateNotCached, PoolRowPastEnd]

#: fault name -> factory of the faulty backend
FAULTS: dict[str, Callable[[], Backend]] = {cls.fault: cls for cls in _CLASSES}


def fault_cases() -> list[Case]:
    """The ``faults`` suite (``cases/faults.toml``): small CPU cases on which the gate must catch
    every fault in :data:`FAULTS` while the clean twin passes."""
    from gdncheck.suites import load_suite

    return load_suite("faults")
