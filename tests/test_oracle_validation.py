"""Bad inputs: the oracle raises ValueError and the message names the argument."""
from __future__ import annotations

import pytest
import torch

from gdncheck_reference import (
    check_cu_seqlens,
    compute_gates,
    gated_delta_rule,
    head_dims,
    pooled_gated_delta_rule,
)

F64 = torch.float64




def inputs(B=1, T=6, H=2, HV=4, K=4, V=4):
    HS = max(H, HV)
    return dict(q=torch.randn(B, T, H, K, dtype=F64), k=torch.randn(B, T, H, K, dtype=F64),
                v=torch.randn(B, T, HV, V, dtype=F64), g=-torch.rand(B, T, HS, dtype=F64),
                beta=torch.rand(B, T, HS, dtype=F64))


def call(**over):
    kw = inputs()
    kw.update(over)
    return gated_delta_rule(**kw)


def raises(match, f, *a, **kw):
    with pytest.raises(ValueError, match=match):
        f(*a, **kw)


BAD_CALLS = {
    # mismatched shapes
    "q 3-D": ("q:", dict(q=torch.zeros(6, 2, 4, dtype=F64))),
    "k 5-D": ("k:", dict(k=torch.zeros(1, 6, 2, 4, 1, dtype=F64))),
    "v 3-D": ("v:", dict(v=torch.zeros(6, 4, 4, dtype=F64))),
    "q/k mismatch": ("q, k", dict(k=torch.zeros(1, 6, 2, 5, dtype=F64))),
    "v batch": ("v:", dict(v=torch.zeros(2, 6, 4, 4, dtype=F64))),
    "v time": ("v:", dict(v=torch.zeros(1, 5, 4, 4, dtype=F64))),
    "g heads": ("g:", dict(g=torch.zeros(1, 6, 2, dtype=F64))),
    "g time": ("g:", dict(g=torch.zeros(1, 7, 4, dtype=F64))),
    "beta heads": ("beta:", dict(beta=torch.zeros(1, 6, 8, dtype=F64))),
    "beta 2-D": ("beta:", dict(beta=torch.zeros(6, 4, dtype=F64))),
    # head counts
    "H=2 HV=3": ("H, HV", dict(v=torch.zeros(1, 6, 3, 4, dtype=F64), g=torch.zeros(1, 6, 3, dtype=F64),
                                beta=torch.zeros(1, 6, 3, dtype=F64))),
    "H=3 HV=2 (GQA not a multiple)": ("H, HV", dict(q=torch.zeros(1, 6, 3, 4, dtype=F64),
                                                    k=torch.zeros(1, 6, 3, 4, dtype=F64),
                                                    v=torch.zeros(1, 6, 2, 4, dtype=F64))),
    "H=0": ("H, HV", dict(q=torch.zeros(1, 6, 0, 4, dtype=F64), k=torch.zeros(1, 6, 0, 4, dtype=F64))),
    # initial state
    "initial_state heads": ("initial_state", dict(initial_state=torch.zeros(1, 2, 4, 4, dtype=F64))),
    "initial_state N": ("initial_state", dict(initial_state=torch.zeros(2, 4, 4, 4, dtype=F64))),
    "initial_state k_last dims": ("initial_state", dict(initial_state=torch.zeros(1, 4, 4, 5, dtype=F64),
                                                        v=torch.zeros(1, 6, 4, 5, dtype=F64), layout="k_last")),
    # cu_seqlens
    "cu non-monotone": ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 4, 2, 6]))),
    "cu not from 0": ("cu_seqlens", dict(cu_seqlens=torch.tensor([1, 3, 6]))),
    "cu short of T": ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 3, 5]))),
    "cu past T": ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 3, 7]))),
    "cu float": ("cu_seqlens", dict(cu_seqlens=torch.tensor([0.0, 6.0]))),
    "cu bool": ("cu_seqlens", dict(cu_seqlens=torch.tensor([False, True]))),
    "cu 2-D": ("cu_seqlens", dict(cu_seqlens=torch.tensor([[0, 6]]))),
    "cu one entry": ("cu_seqlens", dict(cu_seqlens=torch.tensor([0]))),
    "cu with B=2": ("cu_seqlens", dict(**inputs(B=2), cu_seqlens=torch.tensor([0, 6]))),
    "cu and initial_state N": ("initial_state", dict(cu_seqlens=torch.tensor([0, 2, 6]),
                                                     initial_state=torch.zeros(1, 4, 4, 4, dtype=F64))),
    # options
    "layout": ("layout", dict(layout="kv")),
    "form": ("form", dict(form="fused")),
    "chunk_size 0": ("chunk_size", dict(chunk_size=0)),
    "chunk_size -4": ("chunk_size", dict(chunk_size=-4)),
    "chunk_size float": ("chunk_size", dict(chunk_size=16.0)),
    "chunk_size bool": ("chunk_size", dict(chunk_size=True)),
    "scale negative": ("scale", dict(scale=-1.0)),
    "scale nan": ("scale", dict(scale=float("nan"))),
    "scale inf": ("scale", dict(scale=float("inf"))),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_gated_delta_rule_rejects(name):
    match, over = BAD_CALLS[name]
    raises(match, call, **over)


def test_valid_edge_cases_are_accepted():
    call(cu_seqlens=torch.tensor([0, 0, 6, 6], dtype=torch.int32))  # zero-length sequences, int32
    call(scale=0.0)  # 0 means the default, as in FlashInfer
    call(**inputs(T=0))
    call(**inputs(H=4, HV=2))  # GQA
    call(**inputs(H=16, HV=48, K=2, V=2, T=2))


def test_head_dims_and_check_cu_seqlens_directly():
    assert head_dims(16, 32) == 32 and head_dims(16, 48) == 48 and head_dims(4, 2) == 4
    for H, HV in ((2, 3), (3, 2), (16, 40), (0, 4), (4, -4)):
        raises("H, HV", head_dims, H, HV)
    check_cu_seqlens(torch.tensor([0, 0, 0]), 0)
    raises("cu_seqlens", check_cu_seqlens, torch.tensor([0, 3, 2]), 2)


def test_compute_gates_rejects():
    HV = 4
    A, a, dt, b = torch.zeros(HV), torch.zeros(1, 3, HV), torch.zeros(HV), torch.zeros(1, 3, HV)
    raises("a and b", compute_gates, A, a, dt, torch.zeros(1, 3, HV + 1))
    raises("A_log", compute_gates, torch.zeros(HV + 1), a, dt, b)
    raises("A_log", compute_gates, torch.zeros(1, HV), a, dt, b)
    raises("dt_bias", compute_gates, A, a, torch.zeros(2), b)


# --------------------------------------------------------------------------------------
# pooled
# --------------------------------------------------------------------------------------

def pcall(N=3, P=5, layout="v_last", **over):
    kw = inputs(B=N)
    kw.update(pool=torch.zeros(P, 4, 4, 4, dtype=torch.float32), read_indices=torch.arange(N), layout=layout)
    kw.update(over)
    return pooled_gated_delta_rule(**kw)


BAD_POOLED = {
    "read index out of the pool": ("read_indices", dict(read_indices=torch.tensor([0, 5, 1]))),
    "read index far out": ("read_indices", dict(read_indices=torch.tensor([0, 1, 4096]))),
    "write index out of the pool": ("write_indices", dict(write_indices=torch.tensor([0, 1, 5]))),
    "duplicate write indices": ("write_indices", dict(write_indices=torch.tensor([3, 1, 3]))),
    "duplicate read = write indices": ("write_indices", dict(read_indices=torch.tensor([2, 2, 0]))),
    "read_indices count": ("read_indices", dict(read_indices=torch.tensor([0, 1]))),
    "write_indices count": ("write_indices", dict(write_indices=torch.tensor([0, 1, 2, 3]))),
    "read_indices 2-D": ("read_indices", dict(read_indices=torch.tensor([[0, 1, 2]]))),
    "read_indices float": ("read_indices", dict(read_indices=torch.tensor([0.0, 1.0, 2.0]))),
    "write_indices bool": ("write_indices", dict(write_indices=torch.tensor([True, False, True]))),
    "pool heads": ("pool", dict(pool=torch.zeros(5, 2, 4, 4))),
    "pool 3-D": ("pool", dict(pool=torch.zeros(5, 4, 16))),
    "pool k_last dims": ("pool", dict(pool=torch.zeros(5, 4, 4, 5), v=torch.zeros(3, 6, 4, 5, dtype=F64),
                                     layout="k_last")),
    "policy": ("policy", dict(policy="clamp")),
    "zero_length": ("zero_length", dict(zero_length="skip")),
    "layout": ("layout", dict(layout="V_last")),
    "output_init shape": ("output_init", dict(output_init=torch.zeros(3, 6, 4, 5, dtype=F64))),
    "null slot holds a live read": ("read_indices", dict(policy="null_slot", read_indices=torch.tensor([-1, 0, 2]))),
    "null slot holds a live write": ("write_indices", dict(policy="null_slot", read_indices=torch.tensor([-1, 1, 2]),
                                                           write_indices=torch.tensor([-1, 0, 3]))),
    "null slot in an empty pool": ("pool", dict(policy="null_slot", pool=torch.zeros(0, 4, 4, 4),
                                                read_indices=torch.tensor([-1, -1, -1]))),
    "cu_seqlens for the pool": ("cu_seqlens", dict(**inputs(B=1), cu_seqlens=torch.tensor([0, 4, 3, 6]))),
}


@pytest.mark.parametrize("name", list(BAD_POOLED))
def test_pooled_rejects(name):
    match, over = BAD_POOLED[name]
    raises(match, pcall, **over)


def test_pooled_accepts():
    pcall(read_indices=torch.tensor([-1, -1, 4]))  # padding, last slot
    pcall(write_indices=torch.tensor([-1, -1, 4]))  # no write for two rows
    pcall(read_indices=torch.tensor([1, 1, 1]), write_indices=torch.tensor([2, 3, 4]))  # shared read slot
    pcall(write_indices=torch.tensor([3, 3, 3]), disable_state_update=True)  # no writes at all
    pcall(read_indices=torch.tensor([-1, -1, -1]), policy="null_slot")  # all padding
    pcall(read_indices=torch.tensor([2, 0, 1]), policy="null_slot")  # no padding: slot 0 is live
    pcall(read_indices=torch.tensor([-1, 0, 1]), policy="skip")  # only null_slot reserves slot 0
    pcall(read_indices=torch.tensor([0, 1, 2], dtype=torch.int32))
    pcall(P=0, read_indices=torch.tensor([-1, -1, -1]))  # skip: an all-padding call needs no slot
    call(chunk_size=torch.tensor(16).item())
