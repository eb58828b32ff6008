"""A user's plugin backend runs from the CLI by ``package.module:factory`` (README example)."""
import json
from pathlib import Path

from typer.testing import CliRunner

from gdncheck.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_plugin_backend_runs_from_the_cli(tmp_path, monkeypatch):
    suite = tmp_path / "tiny.toml"
    suite.write_text("""
[defaults]
H = 2
HV = 4
K = 16
V = 16
[[case]]
op = "decode"
seqlens = [1, 1, 1]
pool_size = 5
read_indices = [3, -1, 1]
matrix.seed = [1, 2]
[[case]]
op = "prefill"
seqlens = [9, 0, 4]
seed = 3
""")
    monkeypatch.chdir(ROOT)  # the example lives in examples/, found from the working directory
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--backend", "examples.plugin_backend:make", "--suite", str(suite),
                                   "--out", str(out), "--device", "cpu", "--no-progress", "--no-render"])
    assert res.exit_code == 0, res.output
    lines = (out / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["backends"] == ["my-kernel"]
    recs = [json.loads(x) for x in lines[1:]]
    assert len(recs) == 3
    assert all(r["status"] == "ok" and r["backend"] == "my-kernel" for r in recs)
    # the example rounds the oracle to the kernel dtypes: within one floor, contracts hold
    for r in recs:
        assert r["metrics"]["o"]["in_floors"] <= 1.0 + 1e-9
        assert not r["contracts"]["untouched_changed"] and r["contracts"]["unwritten"] == 0


def test_unknown_plugin_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(app, ["run", "--backend", "no_such_pkg.mod:make", "--out", str(tmp_path),
                                   "--device", "cpu", "--no-progress"])
    assert res.exit_code == 2
    assert "no_such_pkg" in res.output
