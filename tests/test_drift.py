"""Drift: logit proxy, growth exponent, position curves and rollouts on CPU at reduced sizes."""
import json
import math

import pytest
import torch
import typer
from typer.testing import CliRunner

from gdncheck.backends import load_backend
from gdncheck.backends.base import Backend, Capabilities, Outputs
from gdncheck.data.case import Case
from gdncheck.cli import app as _cli_app
from gdncheck.data.drift import DriftResult
from gdncheck.drift import growth_exponent, logit_flip_rate, position_error, rollout
from gdncheck.oracle import expected


class RoundOracle(Backend):
    """A kernel that is exact up to storing its output and state once in their dtypes."""

    name = "round-oracle"
    caps = Capabilities(device="cpu")

    def run(self, inputs):
        exp = expected(inputs, self.policy(inputs.case))
        return Outputs(o=exp.o.to(inputs.out.dtype), state=exp.pool.to(inputs.state.dtype), path="round")


class Broken(RoundOracle):
    name = "broken"

    def run(self, inputs):
        raise RuntimeError("kernel launch failed")


class NoBF16(RoundOracle):
    name = "no-bf16-state"
    caps = Capabilities(device="cpu", state_dtypes={"float32"})


def tpl(seed=0, N=2, **kw):
    base = dict(op="decode", seqlens=[1] * N, H=1, HV=2, K=8, V=8, gate_source="raw", seed=seed)
    base.update(kw)
    return Case(**base)


# ---------------------------------------------------------------- logit proxy

@pytest.mark.parametrize("seed", [0, 3])
def test_flip_rate_known_answers(seed):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(200, 4, 8, generator=g, dtype=torch.float64)
    assert logit_flip_rate(ref, ref, 4096, seed=seed) == 0.0
    other = torch.randn(200, 4, 8, generator=g, dtype=torch.float64)  # unrelated outputs: almost all flip
    assert logit_flip_rate(other, ref, 4096, seed=seed) > 0.95
    bf = ref.to(torch.bfloat16)
    r1 = logit_flip_rate(bf, ref, 5000, seed=seed, block=1024)
    r2 = logit_flip_rate(bf, ref, 5000, seed=seed, block=1024)
    assert r1 == r2 and 0.0 <= r1 < 0.1


def test_growth_exponent():
    steps = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    for p in (0.0, 0.5, 1.0):
        assert growth_exponent(steps, [3e-4 * s ** p for s in steps]) == pytest.approx(p, abs=1e-9)
    assert growth_exponent([1, 2], [1.0, 2.0]) is None


# ---------------------------------------------------------------- position

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_position_exact_kernel_sits_on_the_floor(dtype):
    c = position_error(RoundOracle(), tpl(seed=4, dtype=dtype), 256, 4, vocab=2048)
    assert c.status == "ok" and c.bin_edges == [0, 64, 128, 192, 256]
    assert c.rel_l2 == pytest.approx(c.floor_rel_l2, rel=1e-12)
    assert c.flip_rate < 0.05


def test_position_twin_within_a_few_floors():
    c = position_error(load_backend("twin-fla"), tpl(seed=1, H=2, HV=4, K=16, V=16), 384, 3, vocab=2048)
    assert c.status == "ok", c.reason
    for e, f in zip(c.rel_l2, c.floor_rel_l2):
        assert f < e < 8 * f  # fp32 accumulation with bf16 storage: a few rounding floors


def test_unsupported_and_error_are_recorded():
    assert rollout(NoBF16(), tpl(), 20, state_dtype="bfloat16").status == "unsupported"
    c = position_error(Broken(), tpl(), 64, 2)
    assert c.status == "error" and "kernel launch failed" in c.reason


# ---------------------------------------------------------------- rollout

def test_rollout_bf16_state_drifts_fp32_does_not():
    # alpha ~ 1: the decay does not forget old roundings of the carried bf16 state; only the delta
    # rule's correction along k does, so the error grows past one rounding and then levels off
    t = tpl(seed=2, gate_dist="alpha_one")
    r32 = rollout(RoundOracle(), t, 300, state_dtype="float32", points=15, vocab=2048)
    r16 = rollout(RoundOracle(), t, 300, state_dtype="bfloat16", points=15, vocab=2048)
    assert r32.status == r16.status == "ok"
    assert r32.log_steps[0] == 1 and r32.log_steps[-1] == 300
    # fp32 carry: each step adds at most one fp32 rounding
    assert max(r32.state_rel_l2) < 300 * 2 ** -24 * 4
    assert r16.state_rel_l2[-1] > 1000 * r32.state_rel_l2[-1]
    assert r16.state_rel_l2[-1] > 2.5 * r16.state_floor[-1]  # more than one rounding: accumulated
    assert 0.05 < r16.growth < 0.5  # slower than a random walk of independent roundings
    assert r16.flip_rate >= r32.flip_rate


def test_rollout_twin_state_floor():
    r = rollout(load_backend("twin-flashinfer"), tpl(seed=5, H=2, HV=4, K=16, V=16), 120,
                state_dtype="float32", points=10, vocab=1024)
    assert r.status == "ok", r.reason
    assert all(math.isfinite(x) for x in r.state_rel_l2) and r.state_rel_l2[-1] < 1e-5


# ---------------------------------------------------------------- CLI

def test_cli_position_and_rollout(tmp_path):
    app = _cli_app
    run = CliRunner().invoke
    res = run(app, ["drift", "position", "-b", "twin-fla", "-b", "twin-flashinfer", "--T", "128", "--bins", "4",
                    "--H", "1", "--HV", "2", "--K", "8", "--V", "8", "--vocab", "1024", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    d = DriftResult.model_validate_json((tmp_path / "drift-position.json").read_text())
    assert [c.backend for c in d.position] == ["twin-fla", "twin-flashinfer"]
    assert list(tmp_path.glob("drift-position-position-error*.png"))
    res = run(app, ["drift", "rollout", "-b", "twin-fla", "--steps", "30", "--N", "2", "--state-dtype", "bfloat16",
                    "--H", "1", "--HV", "2", "--K", "8", "--V", "8", "--points", "6", "--vocab", "512",
                    "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "drift-rollout.json").read_text())
    assert d["rollout"][0]["status"] == "ok" and d["rollout"][0]["steps"] == 30
    assert len(list(tmp_path.glob("drift-rollout-rollout-*.png"))) == 2
