"""Planted faults are live: each changes some output of :func:`fault_cases` vs the clean twin.

Whether the gate *catches* them is tested with the gate; here only that every fault does
something on the cases built to trigger it, and that the clean twin honours those cases.
"""
from __future__ import annotations

import pytest
import torch

from gdncheck.backends.base import Backend
from gdncheck.backends.faults import FAULTS, fault_cases, clean_twin
from gdncheck.backends.twins import FlashInferTwin
from gdncheck.inputs import materialize
from gdncheck.oracle import expected
from gdncheck_reference import OUT_CALLER, ROW_UNTOUCHED, ROW_WRITTEN




def _bits(t):
    return None if t is None else t.detach().contiguous().view(torch.uint8)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


@pytest.fixture(scope="module")
def cases_and_clean():
    tw = clean_twin()
    out = []
    for case in fault_cases():
        inp = materialize(case)
        res = tw.run(inp.clone())
        out.append((case, inp, res))
    return out


def test_registry_shape():
    assert isinstance(clean_twin(), FlashInferTwin)
    expected_names = {"padding_row_written", "untouched_row_modified", "beta_not_sigmoided", "beta_rounded",
                      "exp_bf16", "l2norm_missing", "layout_transposed", "cu_seqlens_off_by_one",
                      "final_state_not_written", "last_token_not_written", "gva_mapping_wrong",
                      "int32_offset_wrap", "chunk_boundary_error"}
    assert expected_names <= set(FAULTS)
    names = set()
    for key, factory in FAULTS.items():
        b = factory()
        assert isinstance(b, Backend) and isinstance(b, FlashInferTwin)
        assert b.name == f"fault-{key}"
        assert type(b).__doc__ and type(b).__doc__.strip()
        names.add(b.name)
    assert len(names) == len(FAULTS)


def test_fault_cases_cover_the_brief():
    cases = fault_cases()
    tw = clean_twin()
    assert all(tw.supports(c) is None for c in cases)
    assert any(c.padded_rows for c in cases)
    assert any(c.pool_size and max(c.read_indices) >= 4096 and c.HV == 32 for c in cases)
    assert any(c.op == "prefill" and 0 in c.seqlens for c in cases)
    assert any(c.op == "prefill" and any(s > 64 for s in c.seqlens) for c in cases)
    assert any(c.HV > c.H for c in cases)
    assert any(c.op == "verify" and c.intermediate for c in cases)
    assert any(c.gate_source == "raw" for c in cases)
    assert {c.layout for c in cases} == {"k_last", "v_last"}
    assert {tw.policy(c) for c in cases if c.padded_rows} == {"skip", "caller_value", "null_slot"}


def test_clean_twin_honours_fault_cases(cases_and_clean):
    """Untouched rows and caller-owned tokens bit-identical, written rows near the oracle."""
    tw = clean_twin()
    for case, inp, res in cases_and_clean:
        e = expected(inp, tw.policy(case))
        for r in torch.nonzero(e.row_class == ROW_UNTOUCHED).flatten().tolist():
            assert _same(res.state[r], inp.state[r]), (case.name, r)
        w = torch.nonzero(e.row_class == ROW_WRITTEN).flatten()
        d = (res.state[w].double() - e.pool[w]).norm() / e.pool[w].norm()
        assert d < 1e-2, (case.name, float(d))
        oc = e.o_class
        if (oc == OUT_CALLER).any():
            assert _same(res.o[oc == OUT_CALLER], inp.out[oc == OUT_CALLER])


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_live(fault, cases_and_clean):
    b = FAULTS[fault]()
    hits = []
    for case, inp, clean in cases_and_clean:
        res = b.run(inp.clone())
        diff = [k for k, a, c in (("o", res.o, clean.o), ("state", res.state, clean.state),
                                  ("intermediate", res.intermediate, clean.intermediate)) if not _same(a, c)]
        if diff:
            hits.append((case.name, diff))
    assert hits, f"{fault}: no case of fault_cases() changes any output"
