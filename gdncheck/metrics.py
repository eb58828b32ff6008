"""Distances of a backend's outputs to the oracle, and the hard contracts of a call.

Error model. Every distance is computed in float64 against the float64 oracle. Its natural
unit is the *rounding floor*: ``floor_rel_l2 = rel_l2(round(ref, dtype), ref)``, the error of a
kernel that computes exactly and rounds once to its storage dtype. ``in_floors = rel_l2 /
floor_rel_l2`` is then dtype-free: ~1 is perfect, a few is ordinary accumulation in a lower
precision, hundreds is a bug. When a precision twin (a CPU model of the kernel's own rounding)
is given, ``in_twins = rel_l2 / twin_rel_l2`` measures the kernel against what its rounding
scheme predicts.

ULP distance. ``|ord(round(actual, dtype)) - ord(round(ref, dtype))|`` where ``ord`` maps a
float's bit pattern to an integer that is monotonic in its value (sign-magnitude to two's
complement, +0 and -0 both 0). This counts the representable values between the two numbers,
so it is exact across powers of two (where the ULP size changes) and through the subnormal
range, and a correctly rounded result has distance 0. Non-finite elements are left out of the
ULP and continuous statistics; they are counted in ``nan`` / ``inf`` instead.

Relative error floor. ``max_rel = max |a - r| / max(|r|, floor)`` with ``floor`` defaulting to
``max(smallest normal of dtype, 1e-3 * RMS(ref))``: elements far below the tensor's scale
(where relative error means nothing) are measured against a thousandth of its RMS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdncheck.inputs import DTYPES, Inputs
from gdncheck.data.results import Contracts, TensorMetrics
from gdncheck_reference import OUT_CALLER, OUT_ORACLE, ROW_UNTOUCHED, ROW_WRITTEN, PoolResult

F64 = torch.float64
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.float64: torch.int64}
_SIGN_MASK = {torch.int16: 0x7FFF, torch.int32: 0x7FFFFFFF}

__all__ = ["tensor_metrics", "evaluate", "ordered_int", "ulp_distance", "rel_l2", "bits_equal", "nearest_rank",
           "token_rows"]


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def ordered_int(x: torch.Tensor) -> torch.Tensor:
    """Monotonic int64 image of a float tensor's bits (bf16, fp16, fp32): order-preserving, ±0 -> 0."""
    iv = _INT_VIEW.get(x.dtype)
    if iv is None or iv == torch.int64:
        raise TypeError(f"ordered_int: needs bfloat16, float16 or float32, got {x.dtype}")
    i = x.contiguous().view(iv).to(torch.int64)
    mag = i & _SIGN_MASK[iv]
    return torch.where(i < 0, -mag, mag)


def ulp_distance(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | str) -> torch.Tensor:
    """Elementwise ULP distance (int64) in ``dtype`` of ``actual`` and ``ref``, both rounded to ``dtype`` (RNE)."""
    dt = _dtype(dtype)
    return (ordered_int(actual.to(dt)) - ordered_int(ref.to(dt))).abs()


def rel_l2(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - r|| / ||r||`` in float64; 0 when both are 0, inf when only ``r`` is 0."""
    a, r = actual.to(F64), ref.to(F64)
    num, den = torch.linalg.vector_norm(a - r).item(), torch.linalg.vector_norm(r).item()
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit identity (NaN-safe), bool of ``a``'s shape; dtypes must match."""
    if a.dtype != b.dtype:
        return torch.zeros(a.shape, dtype=torch.bool, device=a.device)
    iv = _INT_VIEW.get(a.dtype)
    if iv is None:
        return a == b
    return a.contiguous().view(iv) == b.contiguous().view(iv)


# Quantiles below this many ULPs come from one bincount; only the elements above it are sorted.
_ULP_BINS = 1 << 16


def nearest_rank(x: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Nearest-rank quantiles ``qs`` of a non-negative int64 tensor (exact, any size).

    Above torch.quantile's size limit; and unlike ``torch.kthvalue`` on CUDA, which selects in a
    single thread block per slice, it stays fast on a whole pool: a bincount of the values below
    ``_ULP_BINS`` answers ranks that fall there, the (few) larger values are sorted for the rest.
    """
    x = x.reshape(-1)
    n = x.numel()
    ks = [min(n, max(1, int(round(q * (n - 1))) + 1)) for q in qs]
    below = torch.cumsum(torch.bincount(x.clamp(max=_ULP_BINS), minlength=_ULP_BINS + 1)[:_ULP_BINS], 0)
    n_below = int(below[-1].item())
    big = None
    out = []
    for k in ks:
        if k <= n_below:
            out.append(float(torch.searchsorted(below, k).item()))
        else:
            if big is None:
                big = torch.sort(x[x >= _ULP_BINS]).values
            out.append(float(big[k - n_below - 1].item()))
    return out


def _select(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Elements of ``t`` where ``mask`` (broadcastable) holds, flattened. A mask over leading dims
    only (trailing dims of size 1, as for rows and tokens) selects whole rows without expanding."""
    if mask is None:
        return t.reshape(-1)
    mask = mask.to(t.device)
    lead = mask
    if lead.dim() == t.dim():
        while lead.dim() > 1 and lead.shape[-1] == 1:
            lead = lead.squeeze(-1)
        if tuple(lead.shape) == tuple(t.shape[:lead.dim()]):
            return t.reshape(-1) if bool(lead.all()) else t[lead].reshape(-1)
    return t[mask.expand(t.shape)]


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None:
        return None
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def tensor_metrics(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | str, *,
                   mask: torch.Tensor | None = None, poison_mask: torch.Tensor | None = None,
                   floor: float | None = None, twin: torch.Tensor | None = None) -> TensorMetrics:
    """Distance of ``actual`` to the float64 oracle ``ref`` (module docstring for the definitions).

    Args:
        actual: any shape, any float dtype (what the backend wrote).
        ref: same shape, float64 oracle.
        dtype: storage dtype the comparison is made in (rounding floor, ULPs).
        mask: bool, broadcastable to ``actual``: elements to compare (None = all).
        poison_mask: bool, broadcastable: elements that held the NaN poison before the call
            and had to be written; a NaN left there (oracle finite) counts as ``unwritten``.
        floor: denominator floor of ``max_rel``; default ``max(tiny(dtype), 1e-3 * RMS(ref))``.
        twin: same shape, the precision twin's output for the same call.
    """
    dt = _dtype(dtype)
    dev = actual.device
    ref = ref.to(device=dev)
    a_all, r_all = _select(actual, mask), _select(ref, mask)
    count = int(a_all.numel())
    a_fin, r_fin = torch.isfinite(a_all), torch.isfinite(r_all)
    nan = int(torch.isnan(a_all).sum().item())
    inf = int(torch.isinf(a_all).sum().item())
    unwritten = 0
    if poison_mask is not None:
        pm = _select(poison_mask.to(dev).expand(actual.shape), mask)
        unwritten = int((torch.isnan(a_all) & pm & r_fin).sum().item())
    m = TensorMetrics(count=count, nan=nan, inf=inf, unwritten=unwritten)
    if count == 0:
        return m
    both = a_fin & r_fin
    every = bool(both.all())

    def finite(t: torch.Tensor) -> torch.Tensor:  # the elements finite in both (no copy when all are)
        return t if every else t[both]

    a_b = finite(a_all)
    a64, r64 = a_b.to(F64), finite(r_all).to(F64)
    if a64.numel() == 0:
        return m
    err = (a64 - r64).abs()
    rms_ref = torch.sqrt((r64 * r64).mean()).item()
    if floor is None:
        floor = max(torch.finfo(dt).tiny, 1e-3 * rms_ref)
    m.rel_l2 = rel_l2(a64, r64)
    m.max_abs = float(err.max().item())
    m.max_rel = float((err / torch.clamp(r64.abs(), min=floor)).max().item())
    del err
    na, nr = torch.linalg.vector_norm(a64).item(), torch.linalg.vector_norm(r64).item()
    if na == 0 and nr == 0:
        m.cosine = 1.0
    elif na == 0 or nr == 0:
        m.cosine = 0.0
    else:
        m.cosine = float(torch.dot(a64, r64).item() / (na * nr))
    del a64
    ulp = ulp_distance(a_b, r64, dt)
    (m.ulp_p50, m.ulp_p99), m.ulp_max = nearest_rank(ulp, (0.5, 0.99)), float(ulp.max().item())
    del ulp
    m.floor_rel_l2 = rel_l2(r64.to(dt), r64)
    m.in_floors = _ratio(m.rel_l2, m.floor_rel_l2)
    if twin is not None:
        tw = finite(_select(twin.to(dev), mask))
        m.twin_rel_l2 = rel_l2(tw, r64) if torch.isfinite(tw).all() else float("nan")
        m.in_twins = _ratio(m.rel_l2, m.twin_rel_l2)
    return m


# --------------------------------------------------------------------------- evaluate

def token_rows(inputs: Inputs) -> list[tuple[int, slice]]:
    """Per sequence ``n``: ``(b, token slice)`` into the ``[B, T]`` axes of the built tensors."""
    c = inputs.case
    if c.op == "prefill":
        cu = inputs.cu_seqlens.tolist()
        return [(0, slice(cu[n], cu[n + 1])) for n in range(c.N)]
    return [(n, slice(0, c.T)) for n in range(c.N)]


@dataclass
class _Acc:
    unwritten: int = 0
    nonfinite: int = 0


def _nonfinite_where_finite(actual: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> int:
    m = mask.to(actual.device).expand(actual.shape)
    return int((~torch.isfinite(actual) & torch.isfinite(ref.to(actual.device)) & m).sum().item())


def evaluate(before: Inputs, outputs, exp: PoolResult, *, twin=None) -> tuple[dict[str, TensorMetrics], Contracts]:
    """Metrics and contracts of one call.

    Args:
        before: pristine :meth:`Inputs.clone` of the inputs, taken before the call.
        outputs: the backend's :class:`~gdncheck.backends.base.Outputs`.
        exp: the oracle's :class:`PoolResult` for the call (:func:`gdncheck.oracle.expected`).
        twin: the precision twin's Outputs for the same inputs, or None.

    Returns:
        ``({"o": ..., "state": ..., "intermediate": ...}, Contracts)``; a key is present when
        the call has such elements. ``o`` covers tokens of class OUT_ORACLE (case.dtype);
        ``state`` the pool rows of class ROW_WRITTEN (case.state_dtype; for plain-state cases,
        the final states); ``intermediate`` the tokens of live rows (fp32 buffer).
    """
    c = before.case
    dev = outputs.o.device
    metrics: dict[str, TensorMetrics] = {}
    con = Contracts()
    acc = _Acc()

    # ---- output
    o_ref = exp.o.to(dev)
    tok = (exp.o_class.to(dev) == OUT_ORACLE)[..., None, None]
    poison = torch.isnan(before.out.to(dev)) & tok
    if tok.any():
        m = tensor_metrics(outputs.o, o_ref, c.dtype, mask=tok, poison_mask=poison,
                           twin=None if twin is None else twin.o)
        metrics["o"] = m
        acc.unwritten += m.unwritten
        acc.nonfinite += _nonfinite_where_finite(outputs.o, o_ref, tok)

    # ---- padded rows, per the policy the oracle was built with
    padded = c.padded_rows
    if padded:
        ok, details = True, []
        rows = token_rows(before)
        out_before = before.out.to(dev)
        ocls = exp.o_class.to(dev)
        for n in padded:
            b, sl = rows[n]
            got = outputs.o[b, sl]
            cls = ocls[b, sl]
            if got.numel() == 0:
                continue
            if (cls == OUT_CALLER).all():
                if not bits_equal(got, out_before[b, sl]).all():
                    ok = False
                    details.append(f"row {n}: output changed, policy keeps the caller's buffer")
            elif (cls == OUT_ORACLE).all():  # skip: zeros
                if not (got == 0).all():
                    ok = False
                    bad = int((got != 0).sum().item())
                    details.append(f"row {n}: {bad} output elements not zero, policy 'skip' zeroes them")
            # OUT_UNDEFINED (null_slot): not checked
        con.padded_ok, con.padded_details = ok, details

    # ---- state / pool
    rc = exp.row_class.to(dev)
    written = rc == ROW_WRITTEN
    untouched = rc == ROW_UNTOUCHED
    st = outputs.state
    sdt = DTYPES[c.state_dtype]
    if st is None:
        if written.any():
            con.state_written = False
            con.details.append("backend returned no state but the oracle writes rows "
                               f"{written.nonzero().flatten().tolist()[:16]}")
    else:
        bstate = before.state.to(dev)
        if tuple(st.shape) != tuple(exp.pool.shape):
            con.state_written = False
            con.details.append(f"state shape {tuple(st.shape)}, expected {tuple(exp.pool.shape)}")
        else:
            con.untouched_rows = int(untouched.sum().item())
            if con.untouched_rows:
                stc = st if st.dtype == bstate.dtype else st.to(bstate.dtype)
                same = bits_equal(stc, bstate).flatten(1).all(1)
                con.untouched_changed = (untouched & ~same).nonzero().flatten().tolist()
                if st.dtype != bstate.dtype:
                    con.details.append(f"state returned as {st.dtype}, pool is {bstate.dtype}")
            if written.any():
                ref = exp.pool.to(dev)
                wmask = written.view(-1, *[1] * (st.dim() - 1))
                m = tensor_metrics(st, ref, sdt, mask=wmask,
                                   twin=None if twin is None or twin.state is None else twin.state)
                metrics["state"] = m
                acc.nonfinite += _nonfinite_where_finite(st, ref, wmask)
                # a written row whose oracle value differs from the old row must have changed
                stc = st if st.dtype == bstate.dtype else st.to(bstate.dtype)
                changes = ~bits_equal(ref.to(bstate.dtype), bstate).flatten(1).all(1)
                same = bits_equal(stc, bstate).flatten(1).all(1)
                stale = (written & changes & same).nonzero().flatten().tolist()
                con.state_written = not stale
                if stale:
                    con.details.append(f"rows {stale[:16]} left unchanged, the oracle writes them")

    # ---- intermediate states (verify)
    if c.intermediate:
        live = torch.ones(c.B, c.T, dtype=torch.bool, device=dev)
        for n in padded:
            b, sl = token_rows(before)[n]
            live[b, sl] = False
        if outputs.intermediate is None or exp.intermediate is None:
            con.details.append("no intermediate states returned")
            acc.unwritten += int(live.sum().item()) * int(torch.tensor(before.intermediate.shape[2:]).prod())
        else:
            ref = exp.intermediate.to(dev)
            it = outputs.intermediate
            lm = live.view(c.B, c.T, *[1] * (it.dim() - 2))
            pm = torch.isnan(before.intermediate.to(dev)) & lm
            m = tensor_metrics(it, ref, torch.float32, mask=lm, poison_mask=pm,
                               twin=None if twin is None else twin.intermediate)
            metrics["intermediate"] = m
            acc.unwritten += m.unwritten
            acc.nonfinite += _nonfinite_where_finite(it, ref, lm)

    con.unwritten = acc.unwritten
    # a NaN left in a poisoned slot is "unwritten", not a computed NaN (they cannot be told apart by value)
    con.nan_where_finite = max(0, acc.nonfinite - acc.unwritten)
    return metrics, con
