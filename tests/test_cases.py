"""Suites, materialisation determinism, suite-file errors and the ``cases`` commands (CPU)."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
import typer
from typer.testing import CliRunner

from gdncheck import inputs as cases_mod
from gdncheck.cli import app as _cli_app
from gdncheck.data.case import Case
from gdncheck.inputs import inputs_digest, materialize
from gdncheck.suites import SuiteError, list_suites, load_suite, load_suite_file
from gdncheck.oracle import expected

SUITES = ("smoke", "models", "edges")
MODELS = {"qwen3-next-80b-a3b": (16, 32), "qwen3.5-397b-a17b": (16, 64), "qwen3.5-122b-a10b": (16, 64),
          "qwen3.5-35b-a3b": (16, 32), "qwen3.5-27b": (16, 48)}


def _app() -> typer.Typer:
    return _cli_app


# ---------------------------------------------------------------- determinism

DIGEST_CASES = [
    "smoke/decode/k_last/bfloat16/raw",
    "smoke/prefill/k_last/float32/H2-HV6",
    "edges/strided-gates/verify/raw",
    "edges/strided-pool/prefill/v_last",
]


def _named(name: str) -> Case:
    for s in SUITES:
        for c in load_suite(s):
            if c.name == name:
                return c
    raise KeyError(name)


def test_materialize_is_bit_identical_across_runs_and_processes():
    cases = [_named(n) for n in DIGEST_CASES]
    here = [inputs_digest(materialize(c)) for c in cases]
    assert here == [inputs_digest(materialize(c)) for c in cases]
    script = textwrap.dedent(f"""
        from gdncheck.data.case import Case
        from gdncheck.inputs import inputs_digest, materialize
        for js in {[c.model_dump_json() for c in cases]!r}:
            print(inputs_digest(materialize(Case.model_validate_json(js))))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == here
    # the digest sees the seed: a different seed gives other tensors
    other = inputs_digest(materialize(cases[0].model_copy(update={"seed": cases[0].seed + 1})))
    assert other != here[0]


def _splitmix_normal(seed: int, i: int) -> float:
    """Element ``i`` of :func:`hashed_normal`, in Python integers (the specification)."""
    m = (1 << 64) - 1
    z = ((seed + 1) * 0x632BE59BD9B4E019 + (i + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    s = sum((z >> k) & 0xFFFF for k in (0, 16, 32, 48)) - 131070
    return float(torch.tensor(s, dtype=torch.float32) * torch.tensor((3 / (65536.0 ** 2 - 1)) ** 0.5,
                                                                     dtype=torch.float32))


@pytest.mark.parametrize("seed", [0, 1, 22, 10**6 + 3])
def test_hashed_normal_is_splitmix64_of_the_index_at_any_chunking(seed, monkeypatch):
    want = torch.tensor([_splitmix_normal(seed, i) for i in range(300)], dtype=torch.float32)
    assert torch.equal(cases_mod.hashed_normal(300, seed), want)
    monkeypatch.setattr(cases_mod, "_CHUNK", 7)  # chunk edges inside the range
    assert torch.equal(cases_mod.hashed_normal(300, seed), want)
    x = cases_mod.hashed_normal(1 << 18, seed).double()
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01 and x.abs().max() < 3.47
    assert not torch.equal(cases_mod.hashed_normal(300, seed + 1), want)


def test_large_pools_are_hashed_small_ones_drawn_by_the_generator(monkeypatch):
    c = _named("smoke/decode/k_last/bfloat16/raw")
    small = materialize(c)
    elements = small.state.numel()
    monkeypatch.setattr(cases_mod, "HASHED_POOL_ELEMENTS", elements - 1)
    big = materialize(c)
    # the pool alone changes: every other input is drawn before it
    for name, t in small.tensors().items():
        if name != "state":
            assert torch.equal(t, big.tensors()[name]) or (t.isnan().all() and big.tensors()[name].isnan().all()), name
    scale = torch.tensor(c.state_scale, dtype=torch.float32)
    want = (cases_mod.hashed_normal(elements, c.seed) * scale).to(big.state.dtype).view_as(big.state)
    assert torch.equal(big.state, want) and not torch.equal(big.state, small.state)
    assert inputs_digest(big) == inputs_digest(materialize(c))


def test_strided_views_survive_materialize():
    c = _named("edges/strided-gates/verify/raw")
    i = materialize(c)
    assert not i.a.is_contiguous() and not i.b.is_contiguous()
    p = materialize(_named("edges/strided-pool/prefill/v_last"))
    assert not p.state.is_contiguous() and p.state.stride(0) == 2 * p.state[0].numel()


# ---------------------------------------------------------------- suites

def test_builtin_suites_are_installed():
    assert set(SUITES) <= set(list_suites())


@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_case_validates(suite):
    cases = load_suite(suite)
    assert cases
    assert len({c.id for c in cases}) == len(cases), "two cases of the suite share an id"
    assert len({c.name for c in cases}) == len(cases), "two cases of the suite share a name"
    for c in cases:
        again = Case.model_validate_json(c.model_dump_json())
        assert again.id == c.id and again == c
        assert c.name and suite in c.tags
        if c.padded_rows:  # slot 0 stays the reserved dummy slot when rows are padded
            live = [r for r in c.read_indices if r >= 0] + [w for w in (c.write_indices or []) if w >= 0]
            assert 0 not in live, c.name


def test_smoke_is_small_and_covers_every_op():
    cases = load_suite("smoke")
    assert 20 <= len(cases) <= 60
    assert {c.op for c in cases} == {"prefill", "decode", "verify"}
    assert all(c.HS <= 8 and c.B * c.T <= 128 for c in cases)
    # K = V = 128 for the real kernels, except the small cases FLA's interpreter runs on the CPU
    assert all(c.K == c.V == 128 or ("interp" in c.tags and c.K == c.V == 32) for c in cases)
    assert sum("interp" in c.tags for c in cases) >= 4
    assert any(0 in c.seqlens for c in cases if c.op == "prefill")
    assert any(c.padded_rows for c in cases if c.op == "decode")
    assert any(c.intermediate for c in cases if c.op == "verify")
    assert {c.state_dtype for c in cases} >= {"float32", "bfloat16"}
    assert {c.layout for c in cases} == {"k_last", "v_last"}
    assert {c.HV // c.H for c in cases if c.HV >= c.H} >= {2, 3}


def test_smoke_and_edges_materialize_and_the_oracle_accepts_their_pools():
    """Every CPU-sized case builds; the oracle takes every padded pool under every padding policy."""
    for suite in ("smoke", "edges"):
        for c in load_suite(suite):
            if "large" in c.tags:
                continue
            i = materialize(c)
            assert i.q.shape == (c.B, c.T, c.H, c.K) and i.out.shape == (c.B, c.T, c.HS, c.V)
            assert i.state.shape[0] == (c.pool_size or c.N)
            if c.padded_rows and c.pool_size < 100:
                for pol in ("skip", "null_slot", "caller_value"):
                    assert expected(i, pol, form="recurrent").o.shape == i.out.shape


def test_models_suite_rows_shapes_and_budget():
    cases = load_suite("models")
    assert 60 <= len(cases) <= 120
    rows = set()
    for c in cases:
        tags = dict(t.split(":", 1) for t in c.tags if ":" in t)
        m, tp = tags["model"], int(tags["tp"])
        H, HV = MODELS[m]
        assert (c.H, c.HV) == (H // tp, HV // tp) and H % tp == 0 and HV % tp == 0
        assert c.name.startswith(f"{m}/tp{tp}/{c.op}/")
        assert c.K == c.V == 128 and c.state_dtype == "float32" and c.pool_size is not None
        assert c.gate_strided == (m == "qwen3.5-27b")
        rows.add((m, tp, c.op))
    assert {(m, tp) for m, tp, _ in rows} == {(m, tp) for m in MODELS for tp in (1, 2, 4, 8)}
    assert all((m, tp, op) in rows for m in MODELS for tp in (1, 2, 4, 8) for op in ("prefill", "decode", "verify"))
    # compile keys of the real kernels: (op, T for decode/verify, heads) stay bounded
    keys = {(c.op, c.T if c.op != "prefill" else 0, c.H, c.HV) for c in cases}
    assert len(keys) <= 45
    assert {c.T for c in cases if c.op == "verify"} == set(range(2, 9))
    assert max(c.T for c in cases if c.op == "prefill") >= 8192
    assert {1, 256} <= {c.N for c in cases if c.op == "decode"}
    assert sum(c.B * c.T for c in cases) < 200_000
    assert all(c.read_indices.count(-1) < c.N or c.N == 1 for c in cases)


def test_edges_cover_the_int32_offset_slots():
    cases = [c for c in load_suite("edges") if "int32-offset" in c.tags]
    big = [c for c in cases if "large" in c.tags]
    small = [c for c in cases if "large" not in c.tags]
    assert big and small and {c.op for c in big} == {c.op for c in small}
    for c in cases:
        assert c.HV == 32 and max(c.read_indices) >= 4096
        if c in big:  # slot * HV * V * K crosses 2**31
            assert max(c.read_indices) * c.HV * c.V * c.K >= 2**31
    t = {c.seqlens[0] for c in load_suite("edges") if "chunk" in c.tags and c.N == 1}
    assert t == {1, 63, 64, 65, 127, 128, 129}


# ---------------------------------------------------------------- suite-file errors

def _write(tmp_path, text: str):
    p = tmp_path / "bad.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_malformed_toml_names_file_and_line(tmp_path):
    p = _write(tmp_path, """
        [defaults]
        K = 16

        [[case]]
        op = "decode
    """)
    with pytest.raises(SuiteError) as e:
        load_suite_file(p)
    msg = str(e.value)
    assert str(p) in msg and "line 6" in msg


def test_unknown_key_names_file_line_key_and_choices(tmp_path):
    p = _write(tmp_path, """
        [[case]]
        op = "decode"
        seqlens = [1]

        [[case]]
        op = "decode"
        seqlens = [1, 1]
        stat_dtype = "float32"
    """)
    with pytest.raises(SuiteError) as e:
        load_suite_file(p)
    msg = str(e.value)
    assert f"{p}:9" in msg and "stat_dtype" in msg and "state_dtype" in msg and "case #1" in msg


def test_invalid_value_and_sugar_errors(tmp_path):
    p = _write(tmp_path, """
        [[case]]
        op = "verify"
        seqlens = [1, 2]
    """)
    with pytest.raises(SuiteError, match=r"key 'seqlens'.*verify needs one common T"):
        load_suite_file(p)
    p = _write(tmp_path, """
        [[case]]
        op = "decode"
        batch = 2
        slots = { first = 1, pads = [0] }
    """)
    with pytest.raises(SuiteError, match=r"slots: unknown key.*pads"):
        load_suite_file(p)
    p = _write(tmp_path, """
        [[case]]
        op = "decode"
        batch = 2
        matrix.shape = "nope"
    """)
    with pytest.raises(SuiteError, match=r"unknown axis 'nope'"):
        load_suite_file(p)


def test_matrix_tables_axes_and_placeholders(tmp_path):
    p = _write(tmp_path, """
        [axes]
        shapes = [{ H = 2, HV = 4, vars = { m = "a" } }, { H = 1, HV = 3, vars = { m = "b" }, tags = ["r3"] }]

        [defaults]
        K = 16
        V = 16
        tags = ["t"]

        [[case]]
        name = "{m}/{op}/B{N}-T{T}"
        op = "verify"
        seqlen = 3
        slots = { first = 1, pad_every = 2, free = 1 }
        matrix.shape = "shapes"
        matrix.batch = [1, 4]
    """)
    cases = load_suite_file(p)
    assert [c.name for c in cases] == ["a/verify/B1-T3", "a/verify/B4-T3", "b/verify/B1-T3", "b/verify/B4-T3"]
    c = cases[3]
    assert (c.H, c.HV, c.seqlens, c.read_indices, c.pool_size) == (1, 3, [3] * 4, [1, -1, 3, -1], 6)
    assert c.tags == ["t", "r3"]


# ---------------------------------------------------------------- CLI

def test_cli_bad_suite_exits_2_naming_file_and_key(tmp_path):
    p = _write(tmp_path, """
        [[case]]
        op = "decode"
        seqlens = [1]
        colour = "red"
    """)
    r = CliRunner().invoke(_app(), ["cases", "list", str(p)])
    assert r.exit_code == 2, r.output
    assert str(p) in r.output and "colour" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(_app(), ["cases", "list", "no-such-suite"])
    assert r.exit_code == 2 and "not found" in r.output


def test_cli_cases_list_models_shows_every_model_and_tp():
    r = CliRunner().invoke(_app(), ["cases", "list", "models"], terminal_width=250)
    assert r.exit_code == 0, r.output
    for m in MODELS:
        for tp in (1, 2, 4, 8):
            assert re.search(rf"{re.escape(m)}/tp{tp}/", r.output), (m, tp)
    assert f"{len(load_suite('models'))} cases" in r.output


def test_cli_cases_show_by_id_and_name():
    c = load_suite("smoke")[0]
    for spec in (c.id, c.id[:8], c.name):
        r = CliRunner().invoke(_app(), ["cases", "show", spec])
        assert r.exit_code == 0, r.output
        assert c.id in r.output and "gdncheck repro '" in r.output
    r = CliRunner().invoke(_app(), ["cases", "show", "ffffffffffff"])
    assert r.exit_code == 2 and "no case id" in r.output
