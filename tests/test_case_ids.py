"""Case ids are stable: the cases of the original suites keep the ids baseline results are keyed by.

``tests/data/case_ids_v1.json`` holds the ids of every case of smoke, models and edges as computed
before ``Case.call`` and ``Case.value_edge`` existed.
"""
from __future__ import annotations

import json
from pathlib import Path

from gdncheck.data.case import Case
from gdncheck.suites import load_suite

IDS = json.loads((Path(__file__).parent / "data" / "case_ids_v1.json").read_text())


def test_original_suites_keep_their_ids():
    for suite, ids in IDS.items():
        now = [c.id for c in load_suite(suite)]
        assert now[:len(ids)] == ids, f"{suite}: case ids changed"


def test_late_fields_hash_only_when_set():
    base = Case(op="prefill", seqlens=[3])
    assert Case(op="prefill", seqlens=[3], call={}).id == base.id
    assert Case(op="prefill", seqlens=[3], value_edge=None).id == base.id
    assert Case(op="prefill", seqlens=[3], call={"gate_domain": "log"}).id != base.id
    assert Case(op="prefill", seqlens=[3], call={"gate_domain": "linear"}).id != \
        Case(op="prefill", seqlens=[3], call={"gate_domain": "log"}).id
    assert Case(op="prefill", seqlens=[3], value_edge="qk_zero").id != base.id
