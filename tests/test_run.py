"""The runner: incremental JSONL, resume, worker isolation (a crash is a result, not a stop)."""
import json
import sys
from pathlib import Path

from gdncheck.data.io import load_results
import gdncheck.run as RUN
from gdncheck.shard import schedule as S_schedule, unit_lock as S_unit_lock
from gdncheck.run import run as _run_dir


def run(*a, **kw):
    """The run's results file (each call a fresh run directory unless resumed)."""
    return _run_dir(*a, **kw).dir.results


def read_done(path):
    return {(r.case_id, r.backend) for r in load_results(path)[1]}

sys.path.insert(0, str(Path(__file__).parent))

from crashy_backend import mini_suite as _suite  # noqa: E402


def test_isolated_crash_is_recorded_and_others_survive(tmp_path):
    suite = _suite(tmp_path, [1, 2])
    out = run([str(suite)], ["crashy_backend:crashy", "crashy_backend:exact"], tmp_path / "r",
              device="cpu", isolate=True, twin_spec=None, progress=False)
    header, res = load_results(out)
    assert header.backends == ["test-crashy", "test-exact"]
    by = {(r.backend, r.case.op, r.case.seed): r for r in res}
    assert len(res) == 12
    assert by[("test-crashy", "decode", 1)].status == "crash"
    assert "exit code 77" in by[("test-crashy", "decode", 1)].reason
    assert by[("test-crashy", "verify", 1)].status == "crash"  # device-fault text counts as a crash
    # the crashing backend's other cases ran in fresh workers
    assert by[("test-crashy", "decode", 2)].status == "ok"
    assert by[("test-crashy", "prefill", 1)].status == "ok"
    assert len({r.worker for r in res if r.backend == "test-crashy"}) >= 3
    # the other backend is untouched by its neighbour's crashes
    assert all(r.status == "ok" and r.contracts.ok for r in res if r.backend == "test-exact")


def test_resume_skips_done_pairs_and_repairs_torn_line(tmp_path):
    suite = _suite(tmp_path, [3, 4])
    out = run([str(suite)], ["crashy_backend:exact"], tmp_path / "r", device="cpu", isolate=False, twin_spec=None,
              progress=False)
    lines = out.read_text().splitlines()
    assert len(lines) == 7
    # simulate a run killed mid-write: two results lost, the last one torn
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])
    assert len(read_done(out)) == 3
    seen = []
    run([str(suite)], ["crashy_backend:exact"], tmp_path / "r", device="cpu", isolate=False, twin_spec=None,
        progress=False, on_result=seen.append, resume=True)
    assert len(seen) == 3  # only the missing pairs ran
    final = out.read_text().splitlines()
    assert len(final) == 7
    assert all(json.loads(x) for x in final)
    assert {(json.loads(x)["case_id"]) for x in final[1:]} == {json.loads(x)["case_id"] for x in lines[1:]}


def test_unsupported_is_a_result(tmp_path):
    suite = _suite(tmp_path, [5])
    from crashy_backend import Exact

    class NoPool(Exact):
        name = "test-nopool"

    NoPool.caps = NoPool.caps.model_copy(update={"pool": False})
    seen = []
    import crashy_backend
    crashy_backend.nopool = NoPool
    run([str(suite)], ["crashy_backend:nopool"], tmp_path / "r", device="cpu", isolate=False,
        twin_spec=None, progress=False, on_result=seen.append)
    st = {r.case.op: r for r in seen}
    assert st["decode"].status == "unsupported" and "pool" in st["decode"].reason
    assert st["prefill"].status == "ok"


def test_report_gives_time_by_backend_with_compiles_apart(tmp_path):
    """The runner times a new compile key's first call apart from the run; the report sums both."""
    from gdncheck.report.render import markdown
    from gdncheck.report.summary import summarize

    suite = _suite(tmp_path, [6, 7])
    out = run([str(suite)], ["crashy_backend:exact"], tmp_path / "r", device="cpu", isolate=False,
              twin_spec=None, progress=False)
    header, res = load_results(out)
    keys = {(r.case.op, r.case.T) for r in res}  # the default compile key differs by op and T here
    assert sum(r.timing.compile_s is not None for r in res) == len(keys)
    assert all(r.timing.run_s is not None and r.timing.oracle_s is not None for r in res)
    from gdncheck.budgets import load_budgets
    from gdncheck.judge import judge_run

    b = load_budgets()
    v = judge_run(res, b, planned=header.planned)
    s = summarize(header, res, v, b)
    (tm,) = s["timing"]
    assert tm["cases_run"] == len(res) and tm["compile_keys"] == len(keys)
    assert abs(tm["run_s"] - sum(r.timing.run_s for r in res)) < 1e-9
    assert "## Time by backend" in markdown(s, v)


# ---------------------------------------------------------------- parallel lanes (--jobs)

def _comparable(path):
    _, rs = load_results(path)
    return {(r.case_id, r.backend): r.model_dump(exclude={"timing", "worker", "device"}) for r in rs}


def test_jobs_give_the_same_results_as_one_process(tmp_path):
    suite = _suite(tmp_path, [1, 2])
    specs = ["crashy_backend:exact", "twin-fla"]
    one = run([str(suite)], specs, tmp_path / "one", device="cpu", isolate=False, progress=False)
    par = run([str(suite)], specs, tmp_path / "par", device="cpu", progress=False, jobs=3)
    header, res = load_results(par)
    assert header.jobs == 3
    assert len({r.worker.split("#")[0] for r in res}) > 1  # the work really spread over lanes
    a, b = _comparable(one), _comparable(par)
    assert a.keys() == b.keys() and len(a) == 12
    for k in a:
        assert a[k]["status"] == b[k]["status"] and a[k]["contracts"] == b[k]["contracts"], k
        for t, m in a[k]["metrics"].items():
            for f, x in m.items():
                y = b[k]["metrics"][t][f]
                assert (x == y) or abs(x - y) <= 1e-9 * abs(x), (k, t, f, x, y)  # CPU thread counts differ
    assert all(r.timing.wall_s is not None for r in res if r.status == "ok")


def test_jobs_crash_is_recorded_and_other_lanes_go_on(tmp_path):
    suite = _suite(tmp_path, [1, 2, 3])
    out = run([str(suite)], ["crashy_backend:crashy", "crashy_backend:exact"], tmp_path / "r",
              device="cpu", twin_spec=None, progress=False, jobs=2)
    _, res = load_results(out)
    by = {(r.backend, r.case.op, r.case.seed): r for r in res}
    assert len(res) == 18
    assert by[("test-crashy", "decode", 1)].status == "crash"
    assert by[("test-crashy", "decode", 3)].status == "crash"
    assert by[("test-crashy", "decode", 2)].status == "ok"
    assert all(r.status == "ok" and r.contracts.ok for r in res if r.backend == "test-exact")


def test_jobs_rerun_out_of_memory_cases_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("GDNCHECK_TEST_HUNGRY_FIRST", str(tmp_path / "flag"))
    suite = _suite(tmp_path, [1, 2])
    out = run([str(suite)], ["crashy_backend:hungry"], tmp_path / "r", device="cpu", twin_spec=None,
              progress=False, jobs=2)
    _, res = load_results(out)
    assert (tmp_path / "flag").exists()  # one prefill did run out of memory...
    assert len(res) == 6 and all(r.status == "ok" for r in res)  # ...and was rerun alone


def test_schedule_units_are_compile_keys_longest_first():
    from gdncheck.backends import load_backend
    from gdncheck.data.case import Case
    from gdncheck.execute import case_bytes
    from gdncheck.shard import schedule

    chunk, twin = load_backend("fla-chunk"), load_backend("twin-fla")
    small = [Case(op="decode", seqlens=[1] * n, H=2, HV=4, seed=s) for n in (1, 8) for s in (1, 2)]
    other = [Case(op="decode", seqlens=[1, 1], H=4, HV=8, seed=1)]
    big = Case(op="decode", seqlens=[1], H=2, HV=4, K=64, V=64, pool_size=5000, read_indices=[4999], seed=1)
    assert case_bytes(big) > 8 * max(case_bytes(c) for c in small + other)
    pairs = [(b, c) for b in (twin, chunk) for c in small + other + [big]]
    units = schedule(pairs)
    assert sum(len(u) for u in units) == len(pairs)
    for u in units:
        assert len({(b.name, b.compile_key(c)) for b, c in u}) == 1  # one compile per unit
    assert [b for u in units[:3] for b, _ in u] == [chunk] * 6  # the long compiles start first,
    from gdncheck.shard import load_costs
    cost = [load_costs().unit_cost(u) for u in units]
    assert cost == sorted(cost, reverse=True)  # then by the fitted cost model (gdncheck/costs.toml)
    assert [(chunk, big)] in units[:3] and [(twin, big)] in units[3:]  # the big case: a unit of its own


def test_fla_units_join_the_ops_of_one_shape():
    """fla-chunk's prefill and decode of one shape are one unit (shared autotuning) yet keep
    their own compile keys (compile time is measured per key); other shapes stay apart."""
    from gdncheck.backends import load_backend
    from gdncheck.data.case import Case
    from gdncheck.shard import schedule

    chunk = load_backend("fla-chunk")
    pre = Case(op="prefill", seqlens=[5, 9], H=2, HV=4, gate_source="precomputed", seed=1)
    dec = Case(op="decode", seqlens=[1] * 3, H=2, HV=4, gate_source="raw", seed=2)
    wide = Case(op="decode", seqlens=[1] * 3, H=4, HV=8, gate_source="raw", seed=3)
    assert chunk.compile_key(pre) != chunk.compile_key(dec)
    units = schedule([(chunk, c) for c in (pre, dec, wide)])
    assert sorted(len(u) for u in units) == [1, 2]
    assert {c.id for _, c in max(units, key=len)} == {pre.id, dec.id}


def test_jobs_keep_cases_within_the_memory_budget(tmp_path, monkeypatch):
    """With a budget of one case at a time, two lanes never hold two cases at once."""
    import gdncheck.execute as R

    import time as _time

    spans = []
    real = R.Lane.run

    def timed(self, *a):
        t0 = _time.monotonic()
        res = real(self, *a)
        spans.append((t0, _time.monotonic()))
        return res

    monkeypatch.setattr(R.Lane, "run", timed)
    monkeypatch.setattr(RUN, "memory_budget", lambda device: 1)
    suite = _suite(tmp_path, [1, 2])
    out = run([str(suite)], ["crashy_backend:exact", "twin-fla"], tmp_path / "r", device="cpu",
              progress=False, jobs=2)
    _, res = load_results(out)
    assert len(res) == 12 and all(r.status == "ok" for r in res)
    spans.sort()
    assert len(spans) == 12 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once
    # with room, the lanes do overlap: each lane's first case waits until the other lane's has
    # started too (a lane that could not start beside the other breaks the barrier)
    import threading

    meet, first = threading.Barrier(2, timeout=120), set()

    def together(self, *a):
        if threading.get_ident() not in first:
            first.add(threading.get_ident())
            meet.wait()
        return timed(self, *a)

    monkeypatch.setattr(R.Lane, "run", together)
    monkeypatch.setattr(RUN, "memory_budget", lambda device: 1 << 40)
    spans.clear()
    out = run([str(suite)], ["crashy_backend:exact", "twin-fla"], tmp_path / "r2", device="cpu",
              progress=False, jobs=2)
    assert len(load_results(out)[1]) == 12 and not meet.broken


def test_admission_serves_in_turn_so_a_big_case_is_not_starved():
    """A case that needs most of the budget waits for the cases in flight, and a small case that
    asks after it waits behind it even though it would fit at once."""
    import threading

    from gdncheck.execute import Admission

    gate = Admission(10, threading.Condition())
    gate.acquire(3)
    order = []

    def ask(name, need):
        gate.acquire(need)
        order.append(name)

    big = threading.Thread(target=ask, args=("big", 9))
    big.start()
    while gate._next < 2:  # the big case has asked
        threading.Event().wait(0.01)
    small = threading.Thread(target=ask, args=("small", 1))
    small.start()
    small.join(0.5)
    assert order == [] and small.is_alive() and big.is_alive()  # 3 + 1 would fit; it is not its turn
    gate.release(3)
    big.join(5)
    small.join(5)
    assert order == ["big", "small"] and gate.held == 10


def test_jobs_run_cases_past_the_budget_alone_at_the_end(tmp_path, monkeypatch):
    """Cases whose bytes exceed the budget run after every lane is done, one at a time."""
    import gdncheck.execute as R

    suite = _suite(tmp_path, [1, 2])
    real = R.case_bytes
    monkeypatch.setattr(RUN, "memory_budget", lambda device: 1 << 40)
    monkeypatch.setattr(RUN, "case_bytes", lambda c: (1 << 41) if c.op == "verify" else real(c))
    out = run([str(suite)], ["crashy_backend:exact", "twin-fla"], tmp_path / "r", device="cpu",
              progress=False, jobs=2)
    _, res = load_results(out)
    assert len(res) == 12 and all(r.status == "ok" for r in res)
    big = [r for r in res if r.case.op == "verify"]
    rest = [r for r in res if r.case.op != "verify"]
    assert big and min(r.timing.start_s for r in big) >= max(r.timing.start_s + r.timing.wall_s for r in rest)
    spans = sorted((r.timing.start_s, r.timing.start_s + r.timing.wall_s) for r in big)
    assert all(a[1] <= b[0] + 1e-3 for a, b in zip(spans, spans[1:]))


def test_jobs_settle_unsupported_pairs_without_the_memory_budget(tmp_path, monkeypatch):
    """Declared limits and a missing package are results at once: they take no share of the
    memory budget and no case of theirs reaches a worker; the cases that run record their start."""
    import gdncheck.execute as R

    sent = []
    real = R.Lane.run

    def spy(self, spec, twin, case, base):
        sent.append((spec, case.op))
        return real(self, spec, twin, case, base)

    monkeypatch.setattr(R.Lane, "run", spy)
    monkeypatch.setattr(RUN, "memory_budget", lambda device: 1)
    suite = _suite(tmp_path, [1, 2])
    out = run([str(suite)], ["crashy_backend:absent", "fla-interp", "twin-fla"], tmp_path / "r",
              device="cpu", progress=False, jobs=2)
    _, res = load_results(out)
    assert len(res) == 18
    absent = [r for r in res if r.backend == "test-absent"]
    assert all(r.status == "unsupported" and "not installed" in r.reason for r in absent)
    verify = [r for r in res if r.backend == "fla-interp" and r.case.op == "verify"]
    assert verify and all(r.status == "unsupported" and not r.worker for r in verify)  # declared: no intermediate
    assert all(spec != "crashy_backend:absent" for spec, _ in sent)
    assert ("fla-interp", "verify") not in sent
    ran = [r for r in res if r.status != "unsupported"]
    assert ran and all(r.timing.start_s is not None and r.timing.start_s >= 0 for r in ran)


def test_units_under_one_compile_lock_take_one_lane_at_a_time(tmp_path, monkeypatch):
    """Units whose builds share a lock lead the order and run one at a time (side by side they
    would only wait on the lock); units without a lock fill the other lanes."""
    import time as _time

    import gdncheck.execute as R

    spans: dict[str, list] = {}
    real = R.Lane.run

    def timed(self, spec, twin, case, base):
        t0 = _time.monotonic()
        res = real(self, spec, twin, case, base)
        spans.setdefault(spec, []).append((t0, _time.monotonic()))
        return res

    monkeypatch.setattr(R.Lane, "run", timed)
    suite = _suite(tmp_path, [1, 2, 3])
    from gdncheck.backends import load_backend
    locked, twin = load_backend("crashy_backend:locked"), load_backend("twin-fla")
    from gdncheck.run import plan
    cases = plan([str(suite)], [twin])
    units = S_schedule([(twin, c) for _, c in cases] + [(locked, c) for _, c in cases])
    n_locked = len({locked.compile_key(c) for _, c in cases})
    assert n_locked == 3 and all(S_unit_lock(u) == "test-lock" for u in units[:n_locked])
    assert all(S_unit_lock(u) is None for u in units[n_locked:])
    out = run([str(suite)], ["twin-fla", "crashy_backend:locked"], tmp_path / "r", device="cpu",
              progress=False, jobs=3)
    _, res = load_results(out)
    assert len(res) == 18 and all(r.status == "ok" for r in res)
    chain = sorted(spans["crashy_backend:locked"])
    assert len(chain) == 9 and all(a[1] <= b[0] for a, b in zip(chain, chain[1:]))
    assert len({r.worker for r in res if r.backend == "twin-fla"}) >= 1


def test_each_lane_starts_with_the_unit_it_preloaded():
    """Lane i imports unit i's backends while the run plans (``start_lanes``); it must start with
    that unit, not with whichever unit is first free when its thread asks. Unit 2 shares unit 0's
    compile lock, so lane 2 takes other work, but not lane 3's preloaded unit."""
    import threading

    from gdncheck.execute import Job, run_units

    class FakeLane:
        def __init__(self, name):
            self.name = name

        def close(self, kill=False):
            pass

    got: dict[str, list[int]] = {}
    guard = threading.Lock()
    gate = threading.Barrier(4, timeout=5)

    def job(i):
        def send(lane):
            with guard:
                first = lane.name not in got
                got.setdefault(lane.name, []).append(i)
            if first:
                gate.wait()  # every lane holds its first unit before any finishes
            return i
        return Job(send=send, record=lambda r: None)

    for _ in range(5):
        got.clear()
        gate.reset()
        lanes = [FakeLane(f"lane{k}") for k in range(4)]
        run_units([[job(i)] for i in range(8)], lanes, budget=1 << 40,
                  locks=["L", None, "L", None, None, None, None, None])
        firsts = {name: seq[0] for name, seq in got.items()}
        assert firsts["lane0"] == 0 and firsts["lane1"] == 1 and firsts["lane3"] == 3, got
        assert firsts["lane2"] == 4, got
        assert sorted(i for seq in got.values() for i in seq) == list(range(8))


def test_schedule_lets_the_first_lanes_units_start_together():
    """Among the first ``lanes`` units of a schedule no two share a compile lock, so each lane can
    start the unit it preloaded."""
    from gdncheck.backends import load_backend
    from gdncheck.suites import load_suite

    pairs = [(load_backend(b), c) for b in ("flashinfer-decode", "flashinfer-mtp", "flashinfer-mtp-ssm",
                                           "fla-chunk", "twin-fla") for c in load_suite("smoke")
             if load_backend(b).supports(c) is None]
    for lanes in (2, 4, 8):
        units = S_schedule(pairs, lanes=lanes)
        locks = [S_unit_lock(u) for u in units[:lanes]]
        named = [x for x in locks if x is not None]
        assert len(named) == len(set(named)), locks
        assert sum(len(u) for u in units) == len(pairs)


def test_a_locked_preloaded_unit_waits_while_its_lane_takes_other_work():
    """Unit 1 shares unit 0's compile lock: lane 1 does not wait for it but takes the next free unit."""
    from gdncheck.execute import Job, run_units

    class FakeLane:
        def __init__(self, name):
            self.name = name

        def close(self, kill=False):
            pass

    import threading
    import time
    order: list[tuple[str, int]] = []
    guard = threading.Lock()
    release = threading.Event()

    def job(i):
        def send(lane):
            with guard:
                order.append((lane.name, i))
            if i == 0:
                release.wait(2)
            if i == 2:
                release.set()
            return i
        return Job(send=send, record=lambda r: None)

    lanes = [FakeLane("lane0"), FakeLane("lane1")]
    run_units([[job(i)] for i in range(3)], lanes, budget=1 << 40, locks=["L", "L", None])
    assert ("lane0", 0) in order and ("lane1", 2) in order
    assert order.index(("lane1", 2)) < [i for _, i in order].index(1)
