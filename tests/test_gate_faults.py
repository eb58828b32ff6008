"""Proof that the gate catches faults: every planted fault fails it, the clean twin passes 20 seeds.

Faults are judged without a precision twin (a twin against itself is 1 twin by construction):
on the shipped in_floors budgets and the hard contracts, under the clean twin's backend name.
"""
import json

import pytest
from typer.testing import CliRunner

from gdncheck import gate as G
from gdncheck.backends import faults as F
from gdncheck.cli import app

from gdncheck.budgets import load_budgets  # noqa: E402

BUDGETS = load_budgets()
CLEAN = F.clean_twin()
SEEDS = 20


@pytest.mark.parametrize("fault", sorted(F.FAULTS))
def test_gate_kills_planted_fault(fault):
    _, found = G.judge_fault(F.FAULTS[fault](), F.fault_cases(), BUDGETS, as_backend=CLEAN.name,
                             stop_at_kill=True)
    assert found, f"fault {fault!r} passed the gate on every fault case"


@pytest.mark.parametrize("seed", range(SEEDS))
def test_clean_twin_passes(seed):
    cases = G.reseeded(F.fault_cases(), seed)
    assert len({c.id for c in cases}) == len(cases)
    _, found = G.judge_fault(CLEAN, cases, BUDGETS, as_backend=CLEAN.name)
    assert not found, "false alarm: " + "; ".join(f"{f.case} {f.check}={f.value} > {f.limit}" for f in found)


def test_reseeding_changes_the_inputs():
    c = F.fault_cases()[0]
    assert len({x.id for s in range(SEEDS) for x in G.reseeded([c], s)}) == SEEDS


def test_kill_table_command(tmp_path, monkeypatch):
    """`gdncheck gate --kill-table` (two cheap faults, two seeds): exit 0, then 1 once a 'fault'
    that is really the clean twin must be killed."""
    cases = [c for c in F.fault_cases() if c.op == "decode"][:1]
    monkeypatch.setattr(F, "fault_cases", lambda: cases)
    faults = {k: F.FAULTS[k] for k in ("final_state_not_written", "untouched_row_modified")}
    monkeypatch.setattr(F, "FAULTS", faults)
    run = lambda: CliRunner().invoke(app, ["gate", "--kill-table", "--seeds", "2", "--device", "cpu",  # noqa: E731
                                           "--out", str(tmp_path)])
    r = run()
    assert r.exit_code == 0, r.output
    table = json.loads((tmp_path / "kill_table.json").read_text())
    assert {f["fault"] for f in table["faults"] if f["killed"]} == set(faults)
    assert table["false_alarms"] == 0 and table["missed"] == []
    assert "final_state_not_written" in r.output and "contract:state_written" in r.output

    monkeypatch.setattr(F, "FAULTS", {**faults, "not_a_fault": F.clean_twin})
    r = run()
    assert r.exit_code == 1
    assert json.loads((tmp_path / "kill_table.json").read_text())["missed"] == ["not_a_fault"]
