"""Fuzzing, shrinking and repro bundles on CPU backends defined here (CPU).

``RoundedOracle`` is a perfectly rounded backend: the float64 oracle rounded once to the storage
dtypes, so its error is exactly the rounding floor (in_floors = 1) and it must never fail.
``PaddingFault`` is the same backend with one planted bug: a padded row's output is copied from
the row before it (a kernel that reads the previous row's slot for index -1). The smallest batch
that shows it has one live row followed by one padded row.
"""
from __future__ import annotations

import io
import json
import re

import torch
import typer
from typer.testing import CliRunner

from gdncheck.cli import app as _cli_app
from gdncheck.backends.base import Backend, Capabilities, Outputs
from gdncheck.data.case import Case
from gdncheck.inputs import inputs_digest, materialize
from gdncheck.suites import load_suite
from gdncheck.fuzz import fuzz
from gdncheck.oracle import expected
from gdncheck.execute import run_inputs
from gdncheck.repro import ReproError, find_case, load_bundle, save_bundle

SMALL = dict(dims=(16,), max_tokens=48, max_batch=6)
# small verify cases with every strided view (gates, pool) and padding, both layouts
STRIDED = [Case(op="verify", seqlens=[3, 3, 3], H=2, HV=6, K=16, V=16, layout=lay, gate_source="raw",
                gate_strided=True, pool_strided=True, pool_size=5, read_indices=[2, -1, 4], intermediate=True,
                seed=s) for s, lay in ((5, "k_last"), (6, "v_last"))]


class RoundedOracle(Backend):
    name = "rounded-oracle"
    family = "custom"
    caps = Capabilities(K={16, 128}, V={16, 128}, gqa=True, padding={"skip"})
    padding_policy = {"prefill": "skip", "decode": "skip", "verify": "skip"}

    def run(self, inputs) -> Outputs:
        c = inputs.case
        exp = expected(inputs, self.policy(c), self.zero_length_policy, form="recurrent")
        o = exp.o.to(inputs.out.dtype)
        state = exp.pool.to(inputs.state.dtype)
        inter = exp.intermediate.to(torch.float32) if c.intermediate else None
        return Outputs(o=self._fault(c, o), state=state, intermediate=inter, path="oracle")

    def _fault(self, case: Case, o: torch.Tensor) -> torch.Tensor:
        return o


class PaddingFault(RoundedOracle):
    name = "padding-fault"

    def _fault(self, case, o):
        if case.op != "prefill":
            for n in case.padded_rows:
                if n > 0:
                    o[n] = o[n - 1]
        return o


def test_correct_backend_survives_fuzzing():
    out = io.StringIO()
    rep = fuzz(RoundedOracle(), max_examples=25, profile="ci", out=out, **SMALL)
    assert rep.ok, out.getvalue()
    assert rep.examples >= 25 and out.getvalue().startswith("ok rounded-oracle")


def test_precision_twins_pass_the_floor_screen():
    """Calibration of the floor rule: the CPU twins (correct kernels of their family) pass it on
    bf16 inputs, the dtype the real kernels take."""
    from gdncheck.backends import load_backend
    for name in ("twin-fla", "twin-flashinfer"):
        out = io.StringIO()
        rep = fuzz(load_backend(name), max_examples=15, profile="ci", out=out, dtypes=("bfloat16",),
                   dims=(16, 32), max_tokens=96, max_batch=4)
        assert rep.ok, out.getvalue()


def test_planted_padding_fault_shrinks_to_one_live_and_one_padded_row():
    out = io.StringIO()
    rep = fuzz(PaddingFault(), max_examples=80, profile="ci", out=out, **SMALL)
    assert not rep.ok
    c = rep.failure.case
    assert c.op in ("decode", "verify") and c.N == 2, c
    assert c.read_indices[0] >= 0 and c.read_indices[1] == -1
    assert "padded" in rep.failure.reason or "not zero" in rep.failure.reason
    # the printed repro line carries the minimal case and parses back to it
    line = out.getvalue().strip().splitlines()[-1]
    m = re.fullmatch(r"gdncheck repro '(.*)' --backend padding-fault", line)
    assert m, line
    assert Case.model_validate_json(m.group(1)) == c
    # and the shrunk case still fails while its unpadded version passes
    bad, _ = run_inputs(PaddingFault(), materialize(c))
    assert bad.contracts.padded_ok is False
    fixed = c.model_copy(update={"read_indices": [c.read_indices[0], c.read_indices[0] + 1 if c.read_indices[0] + 1 < c.pool_size else 0]})
    if fixed.read_indices[1] != fixed.read_indices[0] and fixed.write_indices is None:
        good, _ = run_inputs(PaddingFault(), materialize(Case(**fixed.model_dump())))
        assert good.contracts.ok


def test_cli_fuzz_exit_codes(monkeypatch):
    app = _cli_app

    r = CliRunner().invoke(app, ["fuzz", "-b", "test_fuzz:PaddingFault", "-n", "60", "--profile", "ci",
                                 "--dim", "16", "--max-tokens", "24", "--max-batch", "3"])
    assert r.exit_code == 1, r.output
    # the repro line names the spec that loads the backend, so it runs as printed
    assert "gdncheck repro '" in r.output and "--backend test_fuzz:PaddingFault" in r.output
    r = CliRunner().invoke(app, ["fuzz", "-b", "no-such-backend"])
    assert r.exit_code == 2 and "unknown backend" in r.output
    r = CliRunner().invoke(app, ["fuzz", "-b", "test_fuzz:RoundedOracle", "--profile", "weekly"])
    assert r.exit_code == 2 and "profile" in r.output


def test_find_case_by_id_prefix_name_and_json(tmp_path):
    c = load_suite("edges")[3]
    assert find_case(c.id) == c and find_case(c.id[:9]) == c and find_case(c.name) == c
    assert find_case(c.model_dump_json()) == c
    res = tmp_path / "results.jsonl"
    fz = Case(op="decode", seqlens=[1], K=16, V=16, seed=99)
    res.write_text(json.dumps({"kind": "header"}) + "\n" + json.dumps({"case_id": fz.id, "case": fz.model_dump()}) + "\n{torn")
    assert find_case(fz.id, results=res) == fz
    for bad in ("0000000000zz", '{"op": "decode"}'):
        try:
            find_case(bad)
        except ReproError as e:
            assert "case" in str(e)
        else:
            raise AssertionError(bad)


def test_bundle_round_trip_keeps_tensors_strides_and_results(tmp_path):
    for c in STRIDED:
        i = materialize(c)
        save_bundle(i, tmp_path / c.id)
        j = load_bundle(tmp_path / c.id)
        assert j.case == c and inputs_digest(j) == inputs_digest(i)
        for k, t in i.tensors().items():
            u = j.tensors()[k]
            assert u.stride() == t.stride() and u.dtype == t.dtype
            assert torch.equal(u.nan_to_num(7.0), t.nan_to_num(7.0)), k
        a, oa = run_inputs(RoundedOracle(), i)
        b, ob = run_inputs(RoundedOracle(), j)
        assert torch.equal(oa.o.nan_to_num(7.0), ob.o.nan_to_num(7.0)) and torch.equal(oa.state, ob.state)
        assert a.metrics == b.metrics
        assert (tmp_path / c.id / "README").read_text().startswith(f"gdncheck case {c.id}")


def test_cli_repro_saves_and_loads_a_bundle(tmp_path):
    app = _cli_app
    c = STRIDED[0]
    d = tmp_path / "b"
    r = CliRunner().invoke(app, ["repro", c.model_dump_json(), "-b", "test_fuzz:RoundedOracle", "--save", str(d)])
    assert r.exit_code == 0, r.output
    digest = re.search(r"inputs digest ([0-9a-f]{16})", r.output).group(1)
    assert digest == inputs_digest(materialize(c))
    r = CliRunner().invoke(app, ["repro", "--load", str(d), "-b", "test_fuzz:RoundedOracle"])
    assert r.exit_code == 0, r.output
    assert f"inputs digest {digest}" in r.output
    r = CliRunner().invoke(app, ["repro", "--load", str(tmp_path / "nothing"), "-b", "test_fuzz:RoundedOracle"])
    assert r.exit_code == 2 and "not a bundle" in r.output
