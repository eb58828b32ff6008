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


# smoke.toml's own table says which cases were dropped and which moved onto shapes already compiled
# (H = 2, HV 6 -> 4): those four are new cases, every other smoke case keeps its id.
SMOKE_MOVED = {"smoke/decode/plain-state/k_last", "smoke/decode/plain-state/v_last",
               "smoke/decode/strided-pool-and-gates", "smoke/small/verify/float32"}


def test_original_suites_keep_their_ids():
    for suite, ids in IDS.items():
        cases = load_suite(suite)
        if suite == "smoke":
            new = {c.name for c in cases if c.id not in ids}
            assert new <= SMOKE_MOVED, f"smoke: case ids changed for {sorted(new - SMOKE_MOVED)}"
            continue
        now = [c.id for c in cases]
        assert now[:len(ids)] == ids, f"{suite}: case ids changed"


def test_ids_hash_the_original_fields_only():
    """For every case that sets no late field, the id is the hash of the original fields alone."""
    import hashlib

    for suite in ("smoke", "models", "edges", "findings", "faults"):
        for c in load_suite(suite):
            if c.call or c.value_edge:
                continue
            d = c.model_dump(exclude={"name", "tags", "call", "value_edge"})
            blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
            assert c.id == hashlib.sha256(blob.encode()).hexdigest()[:12], c.name


def test_late_fields_hash_only_when_set():
    base = Case(op="prefill", seqlens=[3])
    assert Case(op="prefill", seqlens=[3], call={}).id == base.id
    assert Case(op="prefill", seqlens=[3], value_edge=None).id == base.id
    assert Case(op="prefill", seqlens=[3], call={"gate_domain": "log"}).id != base.id
    assert Case(op="prefill", seqlens=[3], call={"gate_domain": "linear"}).id != \
        Case(op="prefill", seqlens=[3], call={"gate_domain": "log"}).id
    assert Case(op="prefill", seqlens=[3], value_edge="qk_zero").id != base.id
