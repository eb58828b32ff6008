"""Version-aware FlashInfer adapters on the CPU: capabilities follow the (fake) installed signature,
documented errors map to rejections, the api suite's argument oracle runs, and every pair of
argument values is covered.

No FlashInfer here: signatures are injected as parameter sets of 0.7.2.post1 / 0.7.4 (as read from
the wheels, ``api_spec``).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from gdncheck.api_calls import arg_values, expected_prefill_call, page_table
from gdncheck.api_suite import DIMS, _expressible, covering
from gdncheck.backends import load_backend
from gdncheck.backends.api_spec import ENTRY_POINTS, PREFILL, V072, V074, render_markdown, version_of
from gdncheck.backends.flashinfer_api import (
    DocumentedRejection,
    FlashInferCakeMTP,
    FlashInferDecodePaged,
    FlashInferDecodeVLast,
    FlashInferPrefillArgs,
    FlashInferPrefillPaged,
    UndocumentedSuccess,
)
from gdncheck.data.case import Case
from gdncheck.inputs import materialize
from gdncheck.suites import load_suite
from gdncheck.oracle import expected
from gdncheck_reference import ROW_UNTOUCHED, ROW_WRITTEN, gated_delta_rule

BASE = {"q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state", "cu_seqlens",
        "use_qk_l2norm_in_kernel", "output", "output_state", "state_checkpoints", "checkpoint_cu_starts",
        "checkpoint_every_n_tokens", "use_cp", "state_indices", "_cp_chunk_len", "backend", "max_seqlen"}
P072 = BASE
P074 = BASE | {"gate_domain", "use_gate_in_kernel", "A_log", "dt_bias", "beta_is_logit", "cu_seqlens_cpu",
               "output_state_indices", "checkpoint_state_indices", "prefix_lens"}
BACKENDS = {"chunk_gated_delta_rule": FlashInferPrefillArgs, "chunk_gated_delta_rule_paged": FlashInferPrefillPaged,
            "gated_delta_rule_decode_paged": FlashInferDecodePaged, "gated_delta_rule_decode": FlashInferDecodeVLast,
            "cake_gated_delta_product_mtp": FlashInferCakeMTP}


def make(entry, version):
    """The backend of ``entry`` as it sees the signature of ``version`` (read from the wheel)."""
    from gdncheck.backends.api_spec import SIGNATURES
    b = BACKENDS[entry](params=SIGNATURES[version][entry])
    b._pre_params = lambda: P074 if version == V074 else P072
    return b


def test_version_from_signature(monkeypatch):
    import gdncheck.backends.flashinfer as fi
    monkeypatch.setattr(fi, "_fi_version", lambda: V072)
    from gdncheck.backends.api_spec import SIGNATURES
    assert SIGNATURES[V072]["chunk_gated_delta_rule"] == P072 and SIGNATURES[V074]["chunk_gated_delta_rule"] == P074
    assert version_of(P072) == V072 and version_of(P074) == V074 and version_of(None) == "not installed"
    assert "gate_domain" not in make("chunk_gated_delta_rule", V072).arguments
    assert "gate_domain" in make("chunk_gated_delta_rule", V074).arguments
    why = make("chunk_gated_delta_rule_paged", V072).available()
    assert why.startswith("chunk_gated_delta_rule_paged is not") and "(0.7.2.post1); new in 0.7.4" in why


def test_registry_names():
    for n in ("flashinfer-prefill-args", "flashinfer-prefill-paged", "flashinfer-decode-paged",
              "flashinfer-decode-vlast", "flashinfer-cake-mtp"):
        assert load_backend(n).name == n


@pytest.mark.parametrize("version", [V072, V074])
def test_api_suite_supported_per_version(version):
    runs = rejected = unsup = 0
    for c in load_suite("api"):
        entry = c.tags[0].removeprefix("api:")
        b = make(entry, version)
        why = b.available() if version == V072 and ENTRY_POINTS[entry].since == V074 else None
        why = why or FlashInferPrefillArgs.__mro__[1].supports.__get__(b)(c) if False else why or b.supports(c)
        if why:
            unsup += 1
            assert version == V072, f"{c.name}: unsupported on 0.7.4: {why}"
            continue
        if b.invalid_for(c):
            rejected += 1
            assert "documented-error" in c.tags, c.name
        else:
            runs += 1
            assert "documented-error" not in c.tags, c.name
    assert runs > 0
    if version == V074:
        assert unsup == 0 and rejected == sum("documented-error" in c.tags for c in load_suite("api"))


def test_documented_error_and_undocumented_success():
    c = next(c for c in load_suite("api") if c.name.endswith("/invalid") and "use_cp" in c.call
             and c.call["use_cp"] == "yes")
    b = make("chunk_gated_delta_rule", V074)

    def raises(**kw):
        raise ValueError('use_cp must be "auto", True, or False, got \'yes\'')

    with pytest.raises(DocumentedRejection):
        b.call_checked(c, raises)
    with pytest.raises(UndocumentedSuccess):
        b.call_checked(c, lambda **kw: None)
    with pytest.raises(RuntimeError):  # a different error stays an error
        b.call_checked(c, lambda **kw: (_ for _ in ()).throw(RuntimeError("boom")))


@pytest.mark.parametrize("entry", list(DIMS))
def test_every_valid_pair_is_covered(entry):
    """Every pair of values is in a case, or provably in no expressible combination: some third
    argument has no value that is expressible together with the pair (e.g. repeated state_indices
    need output_state_indices, which is documented-invalid with output_final_state=False)."""
    names = [n for n, _ in DIMS[entry]]
    vals = dict(DIMS[entry])
    combos = covering(entry)
    assert all(_expressible(entry, c) for c in combos)
    for a, b in itertools.combinations(names, 2):
        for x in vals[a]:
            for y in vals[b]:
                if any(c[a] == x and c[b] == y for c in combos):
                    continue
                pair = {a: x, b: y}
                blocked = not _expressible(entry, pair) or any(
                    not any(_expressible(entry, {**pair, d: w}) for w in vals[d]) for d in names if d not in pair)
                assert blocked, f"pair {pair} is expressible but in no case"


def test_argument_oracle_agrees_with_plain_oracle():
    # pool, unique rows, no extra arguments: the argument oracle is the pool oracle with the SM90
    # alpha floor, which only moves decays below e^-23 (none in the model distribution)
    c = Case(op="prefill", seqlens=[5, 9], H=1, HV=2, K=16, V=8, pool_size=4, read_indices=[2, 0], call={"api": 1})
    x = materialize(c)
    a = expected_prefill_call(x)
    c0 = c.model_copy(update={"call": {}})
    x0 = materialize(c0)
    p = expected(x0, "skip", "untouched")
    # error model: the adapter hands the kernel alpha = exp(g) rounded to fp32 (2^-24 relative) and the
    # kernel adds 1e-10 to it: each token's decay moves by at most eps relative, T tokens add up
    alpha = torch.exp(x.g.double())
    eps = 2.0 ** -24 + 1e-10 / alpha.min().item()
    tol = 4 * max(c.seqlens) * eps
    assert (a.o - p.o).abs().max() <= tol * p.o.abs().max()
    assert (a.pool - p.pool).abs().max() <= tol * p.pool.abs().max() and torch.equal(a.row_class, p.row_class)
    assert (a.o - p.o).abs().max() > 0  # the floor and the fp32 alpha are modelled, not ignored


def test_paged_case_rows_and_shared_prefix():
    c = Case(op="prefill", seqlens=[10, 20], H=1, HV=1, K=16, V=8,
             call={"page_size": 64, "prefix_lens": "aligned", "shared_prefix": True})
    pt = page_table(c)
    assert pt.page_indices[0] == pt.page_indices[2]  # the full prefix page is shared
    from gdncheck.api_calls import paged_case_fields
    f = paged_case_fields("prefill", [10, 20], c.call)
    assert f["read_indices"] == [pt.page_indices[0]] * 2  # both read the shared page
    cc = Case(**{**c.model_dump(exclude={"name", "tags"}), **f})
    e = expected(materialize(cc))
    assert e.row_class[pt.page_indices[0]] == ROW_UNTOUCHED
    assert (e.row_class == ROW_WRITTEN).sum() == 2


def test_log_domain_and_logit_beta_oracle():
    c = Case(op="prefill", seqlens=[6], H=1, HV=1, K=16, V=8, gate_source="raw", gate_dist="decay_underflow",
             call={"gate_domain": "log", "beta_is_logit": True})
    x = materialize(c)
    e = expected_prefill_call(x)
    # decays far below e^-23: the SM90 floor alpha = 1e-10 keeps 1e-10 of the state, not 0
    from gdncheck_reference import beta_from_logit
    beta = beta_from_logit(x.b[0])[None]
    g = torch.full_like(beta, float(torch.log(torch.tensor(1e-10, dtype=torch.float64))))
    ref = gated_delta_rule(x.q, x.k, x.v, g, beta, cu_seqlens=x.cu_seqlens, initial_state=x.state,
                           use_qk_l2norm=True, layout="k_last", form="recurrent")
    assert torch.allclose(e.o, ref.o, rtol=1e-9, atol=1e-12)


def test_spec_renders_every_entry_point():
    md = render_markdown()
    for e in ENTRY_POINTS.values():
        assert e.name.split(" ")[0] in md
    for n in PREFILL.arguments:
        assert f"`{n}`" in md


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gdncheck.strategies import api_cases, random_cases  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_api_strategy_draws_supported_or_documented(data):
    entry = data.draw(st.sampled_from(list(DIMS)))
    c = data.draw(api_cases(entry))
    b = make(entry, V074)
    assert b.supports(c) is None, (c.name, b.supports(c))
    if b.invalid_for(c) is None:  # legal: the oracle has an answer for every shape it can draw
        assert arg_values(entry, c)


def test_random_cases_reach_the_edges():
    cs = list(random_cases(300, seed=1, edge_values=True, dims=(8,)))
    assert {c.gate_dist for c in cs} >= {"softplus_huge", "softplus_huge_neg", "beta_logit_huge", "decay_underflow"}
    assert {c.value_edge for c in cs} >= {None, "qk_zero", "qk_tiny", "v_huge", "v_subnormal", "poison_padding"}
    # off by default: the draws of a seed are unchanged
    assert all(c.value_edge is None for c in random_cases(50, seed=1, dims=(8,)))


def test_api_suite_file_is_generated():
    from pathlib import Path

    from gdncheck.api_suite import render_toml
    assert (Path(__file__).parent.parent / "cases" / "api.toml").read_text() == render_toml(), \
        "cases/api.toml is stale: python -m gdncheck.api_suite > cases/api.toml"
