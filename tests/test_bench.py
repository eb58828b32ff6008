"""``bench_oracle`` at a tiny size on CPU: both forms run, agree, and the row is complete."""
import math

import pytest

from gdncheck.bench import bench_oracle, environment




def test_bench_oracle_tiny_cpu():
    seen = []
    rows = bench_oracle("cpu", Ts=(16, 37), repeats=2, shape=dict(H=2, HV=4, K=16, V=16), chunk_size=8,
                        on_row=seen.append)
    assert rows == seen and [r["T"] for r in rows] == [16, 37]
    for r in rows:
        assert r["device"] == "cpu" and (r["H"], r["HV"], r["K"], r["V"]) == (2, 4, 16, 16)
        assert r["max_rel_diff"] <= 1e-12
        assert len(r["chunked_times"]) == r["chunked_repeats"] == 2
        assert len(r["recurrent_times"]) == r["recurrent_repeats"] == 2
        assert r["chunked_s"] > 0 and r["recurrent_s"] > 0
        assert math.isclose(r["ratio"], r["recurrent_s"] / r["chunked_s"])
        assert r["threads"] >= 1 and r["torch"]


def test_bench_oracle_long_recurrent_defaults_to_one_repeat(monkeypatch):
    import gdncheck.bench as bench

    monkeypatch.setattr(bench, "LONG_RECURRENT_T", 20)
    rows = bench_oracle("cpu", Ts=(24,), repeats=3, shape=dict(H=1, HV=2, K=4, V=4))
    assert rows[0]["recurrent_repeats"] == 1 and rows[0]["chunked_repeats"] == 3
    rows = bench_oracle("cpu", Ts=(24,), repeats=1, recurrent_repeats=2, shape=dict(H=1, HV=2, K=4, V=4))
    assert rows[0]["recurrent_repeats"] == 2


def test_bench_oracle_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        bench_oracle("cpu", Ts=(4,), shape=dict(D=3))
    with pytest.raises(ValueError, match="repeats"):
        bench_oracle("cpu", Ts=(4,), repeats=0)
    with pytest.raises(ValueError, match="H, HV"):
        bench_oracle("cpu", Ts=(4,), shape=dict(H=3, HV=2, K=4, V=4))


def test_environment():
    env = environment(["cpu"])
    assert env["torch"] and env["threads"] >= 1 and env["device_name[cpu]"]
