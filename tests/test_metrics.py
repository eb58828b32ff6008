"""Metrics on hand-made tensors with known answers, and the contracts of :func:`gdncheck.metrics.evaluate`."""
import math

import pytest
import torch

from gdncheck.backends.base import Outputs
from gdncheck.data.case import Case
from gdncheck.inputs import materialize
from gdncheck.metrics import _ULP_BINS, evaluate, nearest_rank, ordered_int, rel_l2, tensor_metrics, ulp_distance
from gdncheck.oracle import expected

BF, FP, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def ulp(a, r, dt):
    return int(ulp_distance(torch.tensor([a], dtype=F64), torch.tensor([r], dtype=F64), dt).item())


# ---------------------------------------------------------------- ULP: known answers

@pytest.mark.parametrize("dt,mant,emin", [(BF, 7, -126), (FP, 10, -14), (F32, 23, -126)])
def test_ulp_at_powers_of_two(dt, mant, emin):
    for e in (0, 3, -5):
        p = 2.0 ** e
        below, above = p - 2.0 ** (e - mant - 1), p + 2.0 ** (e - mant)  # ULP halves below a power of two
        assert ulp(below, p, dt) == 1
        assert ulp(above, p, dt) == 1
        assert ulp(below, above, dt) == 2  # |a-r|/ulp(r) would say 1.5
        assert ulp(-below, -above, dt) == 2
        assert ulp(p + 2.0 ** (e - mant) * 5, p, dt) == 5


@pytest.mark.parametrize("dt,mant,emin", [(BF, 7, -126), (FP, 10, -14), (F32, 23, -126)])
def test_ulp_through_subnormals_and_zero(dt, mant, emin):
    sub = 2.0 ** (emin - mant)  # smallest subnormal
    normal = 2.0 ** emin
    assert ulp(sub, 0.0, dt) == 1
    assert ulp(-sub, sub, dt) == 2
    assert ulp(-0.0, 0.0, dt) == 0
    assert ulp(normal - sub, normal, dt) == 1  # largest subnormal to smallest normal
    assert ulp(normal, 0.0, dt) == 2 ** mant  # every subnormal lies between
    assert ulp(3 * sub, sub, dt) == 2


def test_ulp_rounds_the_reference_first():
    # 1 + 2^-9 is a quarter bf16 ULP above 1: rounds to 1, so a kernel returning 1 is exact
    assert ulp(1.0, 1.0 + 2.0 ** -9, BF) == 0
    assert ulp(1.0, 1.0 + 3 * 2.0 ** -9, BF) == 1  # rounds up to 1 + 2^-7


def test_ordered_int_is_monotonic():
    for seed in (1, 2, 3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4096, generator=g, dtype=F64) * torch.exp(torch.randn(4096, generator=g, dtype=F64) * 20)
        for dt in (BF, FP, F32):
            xs = torch.sort(x).values.to(dt)
            oi = ordered_int(xs)
            assert (oi[1:] >= oi[:-1]).all()


# ---------------------------------------------------------------- continuous metrics

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_nearest_rank_equals_a_sort(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 5000, (1,), generator=g))
    # a bulk of small distances, a tail past the bincount range, and ties at its edge
    x = torch.randint(0, 50, (n,), generator=g)
    tail = torch.rand(n, generator=g) < [0.0, 0.005, 0.3, 0.9][seed]
    x[tail] = torch.randint(_ULP_BINS - 2, 1 << 40, (int(tail.sum()),), generator=g)
    qs = (0.0, 0.5, 0.9, 0.99, 1.0)
    s = torch.sort(x).values
    want = [float(s[min(n, max(1, round(q * (n - 1)) + 1)) - 1]) for q in qs]
    assert nearest_rank(x, qs) == want


def test_row_mask_and_trailing_mask_select_the_same_elements():
    """A mask over leading dims (rows) and one broadcast from the right (last dim) must not be
    confused when the sizes coincide (B == V here)."""
    g = torch.Generator().manual_seed(5)
    r = torch.randn(4, 3, 4, dtype=F64, generator=g)
    a = (r + 1e-3 * torch.randn(4, 3, 4, dtype=F64, generator=g)).to(F32)
    lead = torch.tensor([True, False, True, True])
    for mask in (lead.view(4, 1, 1), lead):  # rows 0, 2, 3 / last-dim elements 0, 2, 3
        full = mask.expand(a.shape)
        m = tensor_metrics(a, r, F32, mask=mask)
        assert m.count == int(full.sum())
        assert m.rel_l2 == pytest.approx(rel_l2(a[full], r[full]), rel=1e-12)


def test_known_metrics():
    ref = torch.tensor([3.0, 4.0], dtype=F64)
    act = torch.tensor([3.0, 4.5], dtype=F32)
    m = tensor_metrics(act, ref, F32)
    assert m.count == 2
    assert m.rel_l2 == pytest.approx(0.1)
    assert m.max_abs == pytest.approx(0.5)
    assert m.max_rel == pytest.approx(0.125)
    assert m.cosine == pytest.approx((9 + 18) / (5 * math.sqrt(9 + 20.25)))
    assert m.ulp_max == 0.5 / 2.0 ** -21  # fp32 ULP in [4, 8) is 2^-21
    assert m.floor_rel_l2 == 0.0 and m.in_floors == float("inf")


def test_max_rel_floor():
    ref = torch.tensor([1.0, -1.0, 1e-12, 1.0], dtype=F64)
    act = ref.clone()
    act[2] += 1e-6
    m = tensor_metrics(act, ref, F32)
    assert m.max_rel == pytest.approx(1e-6 / (1e-3 * math.sqrt(0.75)))  # floor = 1e-3 * RMS(ref)
    m = tensor_metrics(act, ref, F32, floor=1e-4)
    assert m.max_rel == pytest.approx(1e-2)


@pytest.mark.parametrize("dt", [BF, FP, F32])
@pytest.mark.parametrize("seed", [0, 7, 123])
def test_rounded_oracle_is_one_floor(dt, seed):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(64, 33, generator=g, dtype=F64) * (1 + seed)
    m = tensor_metrics(ref.to(dt), ref, dt)
    assert m.in_floors == pytest.approx(1.0)
    assert m.ulp_max == 0 and m.nan == 0 and m.unwritten == 0
    assert 0 <= 1 - m.cosine <= m.floor_rel_l2 ** 2 + 1e-14  # 1 - cos ~ rel_l2^2 / 2
    # one ULP away everywhere (towards larger magnitude): ULP distance 1 exactly
    iv = {BF: torch.int16, FP: torch.int16, F32: torch.int32}[dt]
    bumped = (ref.to(dt).view(iv) + 1).view(dt)
    m = tensor_metrics(bumped, ref, dt)
    assert m.ulp_p50 == 1 and m.ulp_max == 1 and m.in_floors > 1


def test_nan_inf_unwritten_and_mask():
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(10, 8, generator=g, dtype=F64)
    act = ref.to(BF)
    act[1, 2] = float("nan")  # poison left
    act[3, 4] = float("inf")
    act[9, 0] = float("nan")  # outside the mask
    poison = torch.ones(10, 8, dtype=torch.bool)
    mask = torch.ones(10, 1, dtype=torch.bool)
    mask[9] = False
    m = tensor_metrics(act, ref, BF, mask=mask, poison_mask=poison)
    assert m.count == 72 and m.nan == 1 and m.inf == 1 and m.unwritten == 1
    assert m.ulp_max == 0  # non-finite elements are left out of the statistics
    m2 = tensor_metrics(act, ref, BF, mask=mask)
    assert m2.unwritten == 0 and m2.nan == 1


def test_twin_ratio():
    g = torch.Generator().manual_seed(11)
    ref = torch.randn(256, generator=g, dtype=F64)
    twin = ref + 1e-3 * torch.randn(256, generator=g, dtype=F64)
    act = ref + 3e-3 * torch.randn(256, generator=g, dtype=F64)
    m = tensor_metrics(act.float(), ref, F32, twin=twin.float())
    assert m.twin_rel_l2 == pytest.approx(rel_l2(twin.float(), ref))
    assert m.in_twins == pytest.approx(m.rel_l2 / m.twin_rel_l2)
    assert 2 < m.in_twins < 4.5


# ---------------------------------------------------------------- evaluate: contracts

def _perfect(inputs, exp, case):
    """Outputs of an exact kernel: the oracle rounded to the storage dtypes, caller rows untouched."""
    o = exp.o.to(inputs.out.dtype)
    pool = exp.pool.to(inputs.state.dtype)
    inter = None if exp.intermediate is None else exp.intermediate.to(torch.float32)
    if inter is not None:
        inter = torch.where(torch.isnan(exp.intermediate), inputs.intermediate, inter)  # padded rows
    return Outputs(o=o, state=pool, intermediate=inter)


def _case(seed, **kw):
    base = dict(op="decode", seqlens=[1] * 4, H=2, HV=4, K=16, V=16, pool_size=8,
                read_indices=[1, -1, 3, 5], write_indices=[2, -1, 3, 6], seed=seed)
    base.update(kw)
    return Case(**base)


@pytest.mark.parametrize("seed", [0, 42])
def test_evaluate_exact_kernel_passes(seed):
    c = _case(seed)
    inp = materialize(c)
    before = inp.clone()
    exp = expected(inp, "skip")
    m, con = evaluate(before, _perfect(inp, exp, c), exp)
    assert set(m) == {"o", "state"}
    assert m["o"].in_floors == pytest.approx(1.0) and m["state"].in_floors == pytest.approx(1.0)
    assert con.ok and con.padded_ok is True and con.state_written is True
    assert con.untouched_rows == 5  # 8 slots, 3 written (2, 3, 6)


def test_changed_untouched_row_is_caught():
    c = _case(3)
    inp = materialize(c)
    before = inp.clone()
    exp = expected(inp, "skip")
    out = _perfect(inp, exp, c)
    out.state[7, 1, 2, 3] = torch.nextafter(out.state[7, 1, 2, 3], torch.tensor(10.0))  # one ULP
    out.state[0, 0, 0, 0] = float("nan")
    _, con = evaluate(before, out, exp)
    assert con.untouched_changed == [0, 7] and not con.ok


def test_poisoned_output_counts_as_unwritten():
    c = _case(4)
    inp = materialize(c)
    before = inp.clone()
    exp = expected(inp, "skip")
    out = _perfect(inp, exp, c)
    out.o[2, 0, 1, :5] = float("nan")
    m, con = evaluate(before, out, exp)
    assert m["o"].unwritten == 5 and con.unwritten == 5 and con.nan_where_finite == 0
    out.o[3, 0, 0, 0] = float("inf")
    _, con = evaluate(before, out, exp)
    assert con.nan_where_finite == 1 and not con.ok


def test_skip_row_must_be_zero_and_stale_state_is_caught():
    c = _case(5)
    inp = materialize(c)
    before = inp.clone()
    exp = expected(inp, "skip")
    out = _perfect(inp, exp, c)
    out.o[1] = 0.5  # the padded row
    out.state[6] = before.state[6]  # row 6 should hold sequence 3's final state
    _, con = evaluate(before, out, exp)
    assert con.padded_ok is False and "row 1" in con.padded_details[0]
    assert con.state_written is False


def test_verify_caller_value_and_intermediate():
    c = Case(op="verify", seqlens=[3] * 3, H=2, HV=4, K=8, V=8, pool_size=6, read_indices=[1, -1, 4],
             intermediate=True, seed=9)
    inp = materialize(c)
    inp.out[1] = 0.25  # the caller's value in the padded row
    before = inp.clone()
    exp = expected(inp, "caller_value")
    out = _perfect(inp, exp, c)
    m, con = evaluate(before, out, exp)
    assert con.ok, con
    assert m["intermediate"].count == 2 * 3 * 4 * 8 * 8 and m["intermediate"].in_floors == pytest.approx(1.0)
    out.o[1, 2, 0, 0] = 0.0
    out.intermediate[2, 1, 0, 0, :3] = float("nan")
    m, con = evaluate(before, out, exp)
    assert con.padded_ok is False and con.unwritten == 3 and m["intermediate"].unwritten == 3


def test_plain_state_prefill():
    c = Case(op="prefill", seqlens=[5, 0, 9], H=2, HV=2, K=8, V=8, dtype="float16", seed=1)
    inp = materialize(c)
    before = inp.clone()
    exp = expected(inp)
    out = _perfect(inp, exp, c)
    m, con = evaluate(before, out, exp)
    assert m["state"].count == 3 * 2 * 8 * 8 and con.ok
    _, con = evaluate(before, Outputs(o=out.o, state=None), exp)
    assert con.state_written is False
