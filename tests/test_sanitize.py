"""compute-sanitizer support on the CPU: the report parser on recorded outputs (and variations of
their layout), address mapping onto the case's buffers, and the one-process-per-case runner with a
fake ``compute-sanitizer`` on PATH that runs the real child and prints a recorded report."""
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gdncheck import gate as G
from gdncheck.budgets import load_budgets
from gdncheck.judge import judge_result
from gdncheck import sanitize as S
from gdncheck.data.case import Case
from gdncheck.cli import app

DATA = Path(__file__).parent / "data" / "sanitizer"
BUDGETS = load_budgets()


def _read(name: str) -> str:
    return (DATA / name).read_text()


def _key(rep):
    """What a layout change must not alter."""
    return (rep.errors, rep.warnings, [(f.severity, f.kind, f.access, f.size, f.kernel, f.thread, f.block, f.address,
                                        f.hazards) for f in rep.findings])


def test_memcheck_invalid_write_with_buffer_mapping():
    rep = S.parse_report(_read("memcheck_invalid_write.txt"), "memcheck")
    # the tool counts 3: two invalid writes and the failed API call after them (counted apart)
    assert (rep.errors, rep.api_errors) == (2, 1) and rep.summary == "ERROR SUMMARY: 3 errors"
    w, w2, api = rep.findings
    assert (w.severity, w.kind, w.access, w.space, w.size) == ("error", "Invalid __global__ write", "write", "global", 4)
    assert w.kernel == "gdn_verify_kernel_mtp_0" and w.location == "flashinfer/gdn_kernels/gdn_decode_mtp.py:612"
    assert (w.thread, w.block) == ([64, 0, 0], [17, 3, 0])
    assert w.address_note == "out of bounds"
    assert w.nearest_allocation.startswith("8587837376 bytes before the nearest allocation at 0x7f3c2c000000")
    # the int32 wrap of slot 4096: 2**33 bytes before the pool's first element, plus 0x40
    assert w.buffer == f"{2**33 - 0x40} bytes before the start of state (nearest named buffer)"
    assert w2.thread == [65, 0, 0] and w2.address == hex(int(w.address, 16) + 4)
    assert api.kind == "api cudaErrorLaunchFailure in cudaStreamSynchronize" and api.severity == "api"
    assert "Host Frame" not in w.text and "libcuda" not in w.text
    assert "gdn_verify_kernel_mtp_0" in w.summary() and "thread (64, 0, 0) block (17, 3, 0)" in w.summary()


def test_memcheck_legacy_at_lines_and_shared_memory():
    rep = S.parse_report(_read("memcheck_legacy.txt"))
    a, b = rep.findings
    assert (a.kernel, a.location) == ("write_one_past(float *, int)", "oob_write.cu:6")
    assert a.nearest_allocation == "1 bytes after the nearest allocation at 0x7fe1b6a00000 of size 1023 bytes"
    assert (b.space, b.access, b.size, b.block) == ("shared", "read", 16, [0, 2, 1])
    assert b.kernel.startswith("void cutlass::Kernel2<") and b.location == "cutlass/gemm/kernel.h:88"
    assert rep.errors == 2


def test_triton_write_one_past_maps_onto_a_given_buffer():
    bufs = [{"name": "probe", "lo": 0x7F0C5A000000, "hi": 0x7F0C5A000400, "itemsize": 4}]
    rep = S.parse_report(_read("memcheck_triton_oob.txt"), buffers=bufs)
    (f,) = rep.findings
    assert f.kernel == "store_one_past_kernel" and f.buffer == "0 bytes past the end of probe (nearest named buffer)"


def test_initcheck_counts_beyond_the_printed_findings():
    rep = S.parse_report(_read("initcheck_uninit_read.txt"), "initcheck")
    assert rep.errors == 128 and len(rep.findings) == 2  # the summary counts what the print limit hid
    f = rep.findings[0]
    assert (f.kind, f.access, f.size, f.address, f.address_note) == (
        "Uninitialized __global__ memory read", "read", 4, "0x7f1c1e000430", None)
    assert f.kernel == "gdn_decode_kernel_small_batch_pretranspose_0"


def test_racecheck_analysis_errors_and_warnings():
    rep = S.parse_report(_read("racecheck_analysis.txt"), "racecheck")
    assert (rep.errors, rep.warnings) == (1, 1)
    e, w = rep.findings
    assert (e.severity, e.kind, e.hazards, e.kernel, e.location) == (
        "error", "race Write/Read", 512, "chunk_fwd_kernel_o", "fla/ops/common/chunk_o.py:112")
    assert (w.severity, w.kind, w.hazards) == ("warning", "race Read/Write", 4)


def test_racecheck_hazard_report():
    rep = S.parse_report(_read("racecheck_hazard.txt"), "racecheck")
    (f,) = rep.findings
    assert (f.kind, f.space, f.address, f.block, f.thread) == ("WAW hazard", "shared", "0x80", [0, 0, 0], [0, 0, 0])
    assert f.kernel == "race_kernel(int *)" and rep.errors == 1


def test_clean_report():
    rep = S.parse_report(_read("clean.txt"))
    assert (rep.errors, rep.warnings, rep.findings) == (0, 0, [])
    assert rep.summary == "ERROR SUMMARY: 0 errors"


_VARIATIONS = {
    "crlf": lambda t: t.replace("\n", "\r\n"),
    "longer prefix": lambda t: t.replace("========= ", "=========== "),
    "program output inside a finding": lambda t: t.replace("    by thread", "    by thread", 1).replace(
        "=========     by thread", "stdout line from the program\n=========     by thread"),
    "no 'bytes' after the size": lambda t: t.replace(" bytes\n", "\n").replace(" bytes\r", "\r"),
    "leading spaces": lambda t: "\n".join("  " + ln for ln in t.splitlines()),
    "summary cut off (killed)": lambda t: t[: t.find("========= ERROR SUMMARY")] if "ERROR SUMMARY: 3" in t else t,
}


@pytest.mark.parametrize("name", ["memcheck_invalid_write.txt", "memcheck_legacy.txt", "initcheck_uninit_read.txt",
                                  "racecheck_analysis.txt", "racecheck_hazard.txt", "clean.txt"])
@pytest.mark.parametrize("var", sorted(_VARIATIONS))
def test_parser_tolerates_layout_variations(name, var):
    text = _read(name)
    base = S.parse_report(text)
    got = S.parse_report(_VARIATIONS[var](text))
    assert _key(got) == _key(base), var


def test_unknown_error_lines_are_findings_not_lost():
    text = ("========= COMPUTE-SANITIZER\n========= Internal Sanitizer Error: The Sanitizer encountered an error"
            " while patching the module\n=========     (some detail)\n========= ERROR SUMMARY: 0 errors\n")
    rep = S.parse_report(text)
    assert rep.errors == 1 and rep.findings[0].kind.startswith("Internal Sanitizer Error")


def test_locate_inside_red_zones_and_rows():
    b = [{"name": "state", "alloc_lo": 1000, "lo": 2000, "hi": 6000, "alloc_hi": 7000, "itemsize": 4, "row_bytes": 1000}]
    assert S.locate(2000 + 2508, b) == "state + 2508 bytes (element 627, row 2)"
    assert S.locate(6000 + 1, b) == "state: after guard, 1 bytes past its end, row +0 (red zone)"
    assert S.locate(1999, b) == "state: before guard, 1 bytes before its first element (red zone)"
    assert S.locate(9000, b) == "3000 bytes past the end of state (nearest named buffer)"
    assert S.locate(hex(500), b) == "1500 bytes before the start of state (nearest named buffer)"


# ---------------------------------------------------------------- the runner, with a fake tool

_FAKE = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
if args[:1] == ["--version"]:
    print("NVIDIA (R) Compute Sanitizer\\nVersion 2025.1.1.0 (build 35585475) (public-release)")
    sys.exit(0)
tool = args[args.index("--tool") + 1]
child = subprocess.run(args[args.index("-m") - 1:], capture_output=True, text=True)
sys.stdout.write(child.stdout + child.stderr)
bufs = [json.loads(l.split(" ", 1)[1]) for l in child.stdout.splitlines() if l.startswith("GDNCHECK-BUFFER ")]
state = next(b for b in bufs if b["name"] == "state")
report = open(os.environ["FAKE_SANITIZER_REPORT"]).read()
sys.stdout.write(report.replace("{{ADDR}}", hex(state["hi"] + 4)).replace("{{TOOL}}", tool))
sys.exit(child.returncode)
"""

_REPORT = """========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 4 bytes
=========     at fake_decode_kernel+0x40 in fake.py:3
=========     by thread (1,0,0) in block (2,0,0)
=========     Address {ADDR} is out of bounds
=========
========= ERROR SUMMARY: 1 error
"""

CASE = Case(op="decode", seqlens=[1, 1], H=2, HV=4, K=8, V=8, pool_size=4, read_indices=[1, 3], gate_source="raw",
            seed=7, name="san/decode")


@pytest.fixture
def fake_tool(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "compute-sanitizer"
    exe.write_text(_FAKE.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.delenv("GDNCHECK_COMPUTE_SANITIZER", raising=False)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    report = tmp_path / "report.txt"
    monkeypatch.setenv("FAKE_SANITIZER_REPORT", str(report))
    return report


def test_runner_attaches_the_report_and_maps_the_address(fake_tool, tmp_path):
    assert S.find_sanitizer() == str(tmp_path / "bin" / "compute-sanitizer")
    fake_tool.write_text(_REPORT)
    r = S.sanitize_case("twin-flashinfer", CASE, "memcheck", device="cpu", log_dir=tmp_path / "logs")
    assert r.status == "ok" and r.contracts.ok  # the child really ran the case
    s = r.sanitizer
    assert (s.tool, s.errors, s.exit_code) == ("memcheck", 1, 0)
    (f,) = s.findings
    assert f.kernel == "fake_decode_kernel" and f.buffer.startswith("state: after guard, 4 bytes past its end")
    assert r.repro.endswith("--backend twin-flashinfer --sanitize memcheck")
    assert Path(s.log).read_text().count("GDNCHECK-BUFFER") >= 10  # every guarded input announced
    found = judge_result(r, BUDGETS)
    assert [f.check for f in found] == ["sanitizer:memcheck"] and "--sanitize memcheck" in found[0].repro

    fake_tool.write_text(_read("clean.txt"))
    r = S.sanitize_case("twin-flashinfer", CASE, "memcheck", device="cpu")
    assert r.sanitizer.errors == 0 and not judge_result(r, BUDGETS)

    fake_tool.write_text("========= COMPUTE-SANITIZER\n")  # the tool died before its summary
    r = S.sanitize_case("twin-flashinfer", CASE, "memcheck", device="cpu")
    assert r.sanitizer.errors == 1 and r.sanitizer.findings[0].kind.startswith("no summary")
    assert [f.check for f in judge_result(r, BUDGETS)] == ["sanitizer:memcheck"]


def test_gate_sanitize_command_fails_on_a_finding(fake_tool, tmp_path):
    suite = tmp_path / "mini.toml"
    suite.write_text('[[case]]\nname = "san/decode"\nop = "decode"\nbatch = 2\nH = 2\nHV = 4\nK = 8\nV = 8\n'
                     'slots = { first = 1 }\ngate_source = "raw"\n')
    fake_tool.write_text(_REPORT)
    out = tmp_path / "gate"
    r = CliRunner().invoke(app, ["gate", "--suite", str(suite), "-b", "twin-flashinfer", "-b", "fla-recurrent",
                                 "--device", "cpu", "--sanitize", "memcheck", "--out", str(out), "--no-progress"])
    assert r.exit_code == 1, r.output
    verdict = json.loads((out / "gate.json").read_text())
    assert [f["check"] for f in verdict["failures"]] == ["sanitizer:memcheck"]
    assert verdict["evidence"]["unsupported"] == 1  # fla-recurrent needs CUDA: declared, no process started
    assert "--sanitize memcheck" in (out / "gate.md").read_text()


@pytest.mark.parametrize("argv", [["run", "-s", "smoke", "-b", "twin-fla"], ["gate", "-b", "twin-fla", "--device", "cpu"],
                                  ["repro", "san/decode", "-b", "twin-fla"]])
def test_missing_sanitizer_is_exit_3_in_one_line(argv, monkeypatch, tmp_path):
    monkeypatch.setenv("GDNCHECK_COMPUTE_SANITIZER", str(tmp_path / "absent"))
    if argv[0] == "repro":
        argv = ["repro", CASE.model_dump_json(), "-b", "twin-fla"]
    r = CliRunner().invoke(app, [*argv, "--sanitize", "memcheck", "--out" if argv[0] != "repro" else "--device",
                                 str(tmp_path / "o") if argv[0] != "repro" else "cpu"])
    assert r.exit_code == 3, r.output
    assert "compute-sanitizer not found" in r.output
    r = CliRunner().invoke(app, [*argv, "--sanitize", "leakcheck"])
    assert r.exit_code == 2 and "unknown tool" in r.output


@pytest.mark.parametrize("path", sorted(DATA.glob("*.txt")), ids=lambda p: p.name)
def test_every_recording_parses_to_its_own_summary(path):
    """Any recording dropped into tests/data/sanitizer/ (real ones from the GPU included): the
    error count is the tool's summary, every error finding names what it is, clean means clean."""
    text = path.read_text()
    rep = S.parse_report(text)
    m = S._ERR_SUMMARY.search(text) or S._RACE_SUMMARY.search(text)
    assert m, "a recording ends with the tool's summary line"
    assert rep.errors + rep.api_errors == int(m.group(1))  # the tool's count includes host API errors
    assert all(f.kind for f in rep.findings)
    if rep.errors:
        assert any(f.severity == "error" for f in rep.findings)
    if "clean" in path.name:
        assert rep.errors == 0 and not [f for f in rep.findings if f.severity == "error"]
    if "memcheck" in path.name and rep.errors:
        assert any(f.address and f.access for f in rep.findings)


_SLOW_FAKE = """#!{python}
import os, sys, time
if sys.argv[1:2] == ["--version"]:
    sys.exit(0)
open(os.environ["FAKE_PIDS"], "a").write(f"{{os.getpid()}}\\n")
time.sleep(120)
"""

_STOPPER = """
import sys
from pathlib import Path
from gdncheck.run import run
run([sys.argv[1]], ["twin-fla", "twin-flashinfer"], Path(sys.argv[2]), device="cpu", jobs=2, progress=False,
    sanitize="memcheck")
"""


def test_a_stopped_run_kills_its_sessions_and_records_nothing(tmp_path, monkeypatch):
    """SIGTERM (a timeout) on the runner: the sanitizer sessions (own sessions, so the signal does
    not reach them) are killed, no half result is written, and --resume would redo the pairs."""
    import signal
    import subprocess
    import time

    exe = tmp_path / "compute-sanitizer"
    exe.write_text(_SLOW_FAKE.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    pids = tmp_path / "pids"
    suite = tmp_path / "mini.toml"
    suite.write_text('[[case]]\nop = "decode"\nbatch = 2\nH = 2\nHV = 4\nK = 8\nV = 8\nslots = { first = 1 }\n')
    out = tmp_path / "r"
    env = {**os.environ, "GDNCHECK_COMPUTE_SANITIZER": str(exe), "FAKE_PIDS": str(pids)}
    p = subprocess.Popen([sys.executable, "-c", _STOPPER, str(suite), str(out)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline and (not pids.exists() or len(pids.read_text().split()) < 2):
        time.sleep(0.2)
    started = [int(x) for x in pids.read_text().split()]
    assert len(started) == 2  # two pairs in flight (-j 2)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) != 0
    time.sleep(0.5)
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["kind"] == "header"


def test_sanitize_tier_covers_the_memory_risks():
    cases = [c for s in G.TIERS["sanitize"] for c in __import__("gdncheck.suites", fromlist=["x"]).load_suite(s)]
    assert len({c.id for c in cases}) == len(cases)
    big = [c for c in cases if c.pool_size and c.HV == 32 and max(c.read_indices + (c.write_indices or [])) >= 4096]
    assert {c.op for c in big} == {"prefill", "decode", "verify"}
    assert all(c.pool_size * c.HS * c.K * c.V > 2**31 for c in big)
    assert {c.state_dtype for c in big} == {"float32", "bfloat16"}
    assert any(c.padded_rows and c.op == "decode" for c in cases) and any(c.padded_rows and c.op == "verify" for c in cases)
    assert any(c.write_indices and -1 in c.write_indices and min(c.read_indices) >= 0 for c in cases)
    assert any(c.op == "prefill" and 0 in c.seqlens and c.pool_size for c in cases)
    assert any(c.op == "prefill" and 0 in c.seqlens and not c.pool_size for c in cases)
    for flag in ("pool_strided", "gate_strided", "disable_state_update", "intermediate"):
        assert any(getattr(c, flag) for c in cases), flag
    assert {c.layout for c in cases} == {"k_last", "v_last"} and {c.gate_source for c in cases} == {"raw", "precomputed"}
    assert {"float16", "bfloat16"} <= {c.dtype for c in cases} and not all(c.l2norm for c in cases)
    assert all(c.K == c.V == 128 for c in cases)  # every FlashInfer path runs


def _result_with(rep):
    from gdncheck.data.results import CaseResult, Contracts
    return CaseResult(case_id=CASE.id, case=CASE, backend="flashinfer-decode", status="ok", contracts=Contracts(),
                      sanitizer=rep, repro=CASE.repro("flashinfer-decode"))


def test_host_api_errors_alone_do_not_fail_a_case():
    """compute-sanitizer also counts host API calls that returned an error (on the H200, cuda-python
    probing cuGetProcAddress at import: 34 per FlashInfer case); they are not memory accesses."""
    text = ("========= COMPUTE-SANITIZER\n"
            + '========= Program hit CUDA_ERROR_INVALID_VALUE (error 1) due to "invalid argument" on CUDA API call '
              "to cuGetProcAddress_v2.\n=========     Saved host backtrace up to driver entry point at error\n"
              "=========         Host Frame:  [0xd4a2] in cydriver.cpython-312-x86_64-linux-gnu.so\n=========\n") * 2
    text += "========= ERROR SUMMARY: 2 errors\n"
    rep = S.parse_report(text, "memcheck")
    assert (rep.errors, rep.api_errors) == (0, 2)
    assert all(f.severity == "api" for f in rep.findings)
    r = _result_with(rep)
    assert not judge_result(r, BUDGETS)
    oob = S.parse_report(_read("h200_memcheck_oob.txt"), "memcheck")  # a real recording of a planted write
    assert (oob.errors, oob.api_errors) == (1, 2)
    w = oob.findings[0]
    assert (w.kind, w.size, w.thread, w.address) == ("Invalid __global__ write", 4, [64, 0, 0], "0x7f7e54800400")
    assert w.nearest_allocation == "1 bytes after the nearest allocation at 0x7f7e54800000 of size 1024 bytes"
    assert judge_result(_result_with(oob), BUDGETS)[0].check == "sanitizer:memcheck"
