"""The case strategies: validity of drawn cases, capabilities honoured, settings profiles (CPU)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings

from gdncheck.backends.base import Backend, Capabilities
from gdncheck.data.case import Case
from gdncheck.strategies import (HEADS, cases, load_profile, profile_name, random_cases,
                                 register_profiles)


def _consistent(c: Case, max_tokens: int = 160, max_batch: int = 8) -> None:
    """Invariants every drawn case keeps, beyond what Case validation checks."""
    again = Case.model_validate_json(c.model_dump_json())
    assert again == c and again.id == c.id
    assert (c.H, c.HV) in HEADS
    assert 1 <= c.N <= max_batch
    assert c.B * c.T <= max_tokens or c.op == "decode"
    if c.pool_size is not None:
        live = [r for r in c.read_indices if r >= 0]
        assert len(set(live)) == len(live) and all(r < c.pool_size for r in live)
        if c.padded_rows:
            assert 0 not in live and 0 not in (c.write_indices or [])
            assert c.op != "prefill"
    if not c.l2norm:  # beta |k|^2 <= 2 on average keeps the recurrence contractive
        assert c.K * c.qk_scale**2 <= 0.5
    assert c.tags == ["fuzz"]


def test_ten_thousand_drawn_cases_validate():
    """The construction space, driven by a seeded RNG (the Hypothesis strategy uses the same builder)."""
    seen = set()
    for c in random_cases(10_000, seed=1234):
        _consistent(c)
        seen.add((c.op, c.layout, c.state_dtype, bool(c.padded_rows), c.pool_strided, c.gate_strided))
    # the space is actually explored: every op x layout x padding combination shows up
    assert {(op, lay, pad) for op, lay, _, pad, _, _ in seen} >= {
        (op, lay, pad) for op in ("decode", "verify") for lay in ("k_last", "v_last") for pad in (False, True)}


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(cases())
def test_hypothesis_drawn_cases_validate(c):
    _consistent(c)


class _Narrow(Backend):
    """A backend with narrow capabilities: decode and verify only, V-last fp32, K = V = 32, no pools
    strided, no raw gates, no custom scale, no intermediate states; padding policy ``skip``."""

    name = "narrow"
    caps = Capabilities(ops={"decode", "verify"}, dtypes={"bfloat16"}, state_dtypes={"float32"},
                        layouts={"v_last"}, K={32}, V={32}, gva=True, gqa=False, strided_pool=False,
                        strided_gates=False, gate_sources={"precomputed"}, l2norm={True}, intermediate=False,
                        disable_state_update=False, custom_scale=False, padding={"skip"})
    padding_policy = {"decode": "skip", "verify": "caller_value"}  # verify padding unsupported

    def run(self, inputs):  # pragma: no cover - never run here
        raise NotImplementedError


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(cases(_Narrow()))
def test_capabilities_are_honoured(c):
    b = _Narrow()
    assert b.supports(c) is None
    assert c.op in {"decode", "verify"} and c.layout == "v_last" and c.K == c.V == 32
    assert c.dtype == "bfloat16" and c.state_dtype == "float32" and c.H <= c.HV
    assert not (c.pool_strided or c.gate_strided or c.intermediate or c.disable_state_update)
    assert c.gate_source == "precomputed" and c.scale is None and c.l2norm
    if c.op == "verify":
        assert not c.padded_rows


def test_random_cases_honour_capabilities_and_reject_the_impossible():
    b = _Narrow()
    assert all(b.supports(c) is None for c in random_cases(500, seed=7, backend=b))
    with pytest.raises(ValueError, match="no K left"):
        list(random_cases(1, backend=b, dims=(16, 64)))


def test_profiles():
    register_profiles()
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.database is None and ci.deadline is None and ci.max_examples <= 100
    assert settings.get_profile("nightly").max_examples >= 1000
    assert profile_name("nightly") == "nightly"
    with pytest.raises(ValueError, match="profile"):
        profile_name("weekly")


def test_profile_selection_from_environment(monkeypatch):
    current = settings._current_profile
    try:
        monkeypatch.delenv("GDNCHECK_PROFILE", raising=False)
        monkeypatch.setenv("CI", "1")
        assert load_profile() == "ci" and settings.default.derandomize
        monkeypatch.setenv("GDNCHECK_PROFILE", "nightly")
        assert load_profile() == "nightly"
        monkeypatch.delenv("GDNCHECK_PROFILE")
        monkeypatch.delenv("CI")
        assert profile_name() == "dev"
    finally:
        settings.load_profile(current)
