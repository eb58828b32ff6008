"""Red zones: guarded copies keep values and strides; any write outside a buffer is reported with
tensor, side and first offset; the runner makes such writes (and writes into inputs) hard contract
failures; the planted fault that writes one row past the pool is caught by the red zone only."""
import pytest
import torch

from gdncheck import gate as G
from gdncheck.budgets import load_budgets
from gdncheck.judge import judge_result
from gdncheck import redzone
from gdncheck.backends import faults as F
from gdncheck.data.case import Case
from gdncheck.inputs import materialize
from gdncheck.redzone import RedZones, sentinel
from gdncheck.execute import run_case

BUDGETS = load_budgets()
CLEAN = F.clean_twin()

POOL_CASE = Case(op="decode", seqlens=[1] * 3, H=2, HV=4, K=16, V=16, pool_size=8, read_indices=[1, 4, 7],
                 gate_source="raw", seed=3)
STRIDED_CASE = POOL_CASE.model_copy(update={"pool_strided": True, "gate_strided": True, "read_indices": [1, -1, 6]})


@pytest.mark.parametrize("dtype,quiet_bit", [(torch.float32, 22), (torch.bfloat16, 6), (torch.float16, 9),
                                             (torch.float64, 51)])
def test_sentinel_is_a_signalling_nan_unlike_any_computed_nan(dtype, quiet_bit):
    iv, pat = sentinel(dtype)
    t = torch.empty(4, dtype=dtype)
    t.view(iv).fill_(pat)
    assert torch.isnan(t).all()
    assert not (pat >> quiet_bit) & 1  # quiet bit clear: hardware arithmetic never yields it
    for nan in (torch.tensor(float("nan"), dtype=dtype), torch.zeros(1, dtype=dtype) / 0,
                torch.full((1,), float("inf"), dtype=dtype) - float("inf")):
        assert int(nan.reshape(1).view(iv)[0]) != pat


@pytest.mark.parametrize("case", [POOL_CASE, STRIDED_CASE,
                                  Case(op="prefill", seqlens=[5, 0, 9], H=2, HV=4, K=16, V=8, seed=4),
                                  Case(op="verify", seqlens=[3, 3], H=2, HV=4, K=8, V=16, pool_size=5,
                                       read_indices=[2, -1], intermediate=True, state_dtype="bfloat16",
                                       layout="v_last", seed=5)], ids=["pool", "strided", "prefill", "verify"])
def test_guarded_copy_keeps_values_strides_and_alignment(case):
    inp = materialize(case)
    rz = RedZones()
    g = rz.guard_inputs(inp)
    for name, t in inp.tensors().items():
        u = getattr(g, name)
        assert u.stride() == t.stride() and u.shape == t.shape and u.dtype == t.dtype, name
        same = torch.equal(u.view(torch.uint8) if u.dtype == torch.uint8 else u.contiguous().view(torch.uint8),
                           t.contiguous().view(torch.uint8))
        assert same, name
    if case.pool_strided:
        assert not g.state.is_contiguous()
    if case.gate_strided:  # a and b stay cut from one projection buffer
        assert g.a.untyped_storage().data_ptr() == g.b.untyped_storage().data_ptr()
    for z in rz.zones:
        es = z.flat.element_size()
        assert (z.pre * es) % redzone.ALIGN_BYTES == 0
        assert z.pre * es >= redzone.MIN_GUARD_BYTES and z.post * es >= redzone.MIN_GUARD_BYTES
    pool = next(z for z in rz.zones if "state" in z.name)
    assert pool.pre >= g.state.stride(0) and pool.post >= g.state.stride(0)  # whole rows around the pool
    assert rz.check() == []


def _past(t: torch.Tensor, elems: int) -> torch.Tensor:
    """A view of ``t``'s storage shifted by ``elems`` elements (as an out-of-bounds index would reach)."""
    return torch.as_strided(t, t.shape, t.stride(), t.storage_offset() + elems)


@pytest.mark.parametrize("case", [POOL_CASE, STRIDED_CASE], ids=["pool", "strided"])
@pytest.mark.parametrize("where", ["row_after", "element_after", "element_before", "row_before"])
def test_write_outside_the_pool_names_tensor_side_and_offset(case, where):
    rz = RedZones()
    st = rz.guard_inputs(materialize(case)).state
    P, row = st.shape[0], st.stride(0)
    last = (P - 1) * row + redzone._extent(st[0])  # one past the view's last element, from its start
    if where == "row_after":
        _past(st[:1], P * row)[0].fill_(0.5)  # slot P: one row past the pool
        side, off, r = "after", P * row - last, 0
    elif where == "element_after":
        _past(st.reshape(-1)[:1] if st.is_contiguous() else st[0, 0, 0, :1], last)[0] = 0.0
        side, off, r = "after", 0, 0
    elif where == "element_before":
        _past(st[0, 0, 0, :1], -1)[0] = 0.0
        side, off, r = "before", -1, -1
    else:
        _past(st[:1], -row)[0].fill_(1.0)  # slot -1
        side, off, r = "before", -row, -1
    found = rz.check()
    assert [(v.tensor, v.side, v.offset, v.row) for v in found] == [("state", side, off, r)], found
    assert "state: " + side in str(found[0])


def test_write_into_the_holes_of_a_strided_pool():
    rz = RedZones()
    st = rz.guard_inputs(materialize(STRIDED_CASE)).state
    slot = st[0].numel()
    _past(st[2:3], -slot)[0, 0, 1, 2] = 3.0  # the other layer's slot 1 of a layer-interleaved pool
    found = rz.check()
    assert [(v.tensor, v.side) for v in found] == [("state", "hole")]
    assert found[0].offset == 2 * st.stride(0) - slot + 1 * st.stride(2) + 2


def test_empty_guarded_registers_with_the_session_only():
    plain = redzone.empty_guarded("x", (3, 4), torch.float32, "cpu", fill=float("nan"))
    assert plain.untyped_storage().nbytes() == 3 * 4 * 4
    with RedZones() as rz:
        buf = redzone.empty_guarded("output_state", (3, 4), torch.float32, "cpu", fill=float("nan"))
        assert torch.isnan(buf).all() and len(rz.zones) == 1
    assert rz.check() == []
    _past(buf[:1], 3 * 4)[0, 0] = 1.0
    assert [(v.tensor, v.side, v.offset) for v in rz.check()] == [("output_state", "after", 0)]


def test_clean_twin_leaves_every_guard_and_input_alone():
    for c in F.fault_cases() + [STRIDED_CASE]:
        r = run_case(CLEAN, c)
        assert r.status == "ok" and r.contracts.redzone == [] and r.contracts.inputs_modified == [], c.name
        assert not judge_result(r, BUDGETS), c.name


@pytest.mark.parametrize("case", [c for c in F.fault_cases() if c.pool_size][:3] + [STRIDED_CASE],
                         ids=lambda c: c.name or "strided")
def test_pool_row_past_end_is_caught_by_the_red_zone_only(case, monkeypatch):
    fault = F.FAULTS["pool_row_past_end"]()
    r = run_case(fault, case)
    checks = {f.check for f in judge_result(r, BUDGETS, as_backend=CLEAN.name)}
    assert checks == {"contract:redzone"}, checks
    assert r.contracts.redzone[0].startswith("state: after guard changed")
    monkeypatch.setenv("GDNCHECK_REDZONE", "0")  # plain allocations: the write has nowhere visible to go
    r = run_case(fault, case)
    assert not judge_result(r, BUDGETS, as_backend=CLEAN.name)


class _WritesItsInputs(F.FlashInferTwin):
    name = "test-writes-inputs"

    def run(self, inputs):
        out = super().run(inputs)
        inputs.k[..., 1] += 1  # e.g. an in-place L2 norm of k
        inputs.read_indices[-1] = 0 if inputs.read_indices is not None else None
        return out


def test_a_backend_that_writes_its_inputs_fails_the_inputs_contract():
    r = run_case(_WritesItsInputs(), POOL_CASE)
    assert [s.split(":")[0] for s in r.contracts.inputs_modified] == ["k", "read_indices"]
    assert "contract:inputs_modified" in {f.check for f in judge_result(r, BUDGETS, as_backend=CLEAN.name)}
