"""One verdict everywhere: the reproductions a new user hit, each a regression test.

1. ``run`` passes no wrong kernel: its exit code, console, report files and ``gate --results``
   agree. 2. Fresh by default: no silent reuse of an older run; resume only with a matching
   fingerprint. 3. No pass on no evidence: nothing judged, a baseline that shares nothing, a
   merge with a missing shard, a cut results file. 4. (ablate: tests/test_ablate.py) 5. Errors
   carry the right exit code, in one line. 6. The plugin example passes and its repro lines run
   as printed. 7. Reports explain.
"""
import fcntl
import json
import shlex
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gdncheck.backends import faults as F
from gdncheck.cli import app
from gdncheck.data.io import load_results, write_results

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from crashy_backend import mini_suite  # noqa: E402

EXACT = "crashy_backend:exact"


def cli(*args, cwd=None):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def _run(*args):
    return cli("run", "--device", "cpu", "--no-progress", *args)


# ---------------------------------------------------------------- 1. no pass on a wrong kernel

@pytest.mark.parametrize("fault", ["gva_mapping_wrong", "final_state_not_written"])
def test_run_fails_a_wrong_kernel_and_every_output_agrees(tmp_path, fault):
    out = tmp_path / "f"
    code, text = _run("-b", f"fault-{fault}", "-s", "faults", "--no-isolate", "--out", out)
    assert code == 1, text
    assert "FAIL (exit 1)" in text and " 0 fail" not in text
    summary = json.loads((out / "summary.json").read_text())
    verdict = json.loads((out / "verdict.json").read_text())
    failed = summary["totals"]["fail"]
    assert failed > 0 and verdict["evidence"]["failed"] == failed and verdict["exit_code"] == 1
    junit = (out / "junit.xml").read_text()
    assert junit.count("<failure") == failed
    assert f"**{summary['totals']['passed']} pass" not in (out / "report.md").read_text()
    code2, text2 = cli("gate", "--results", out / "results.jsonl", "--out", tmp_path / "g")
    assert code2 == 1 and json.loads((tmp_path / "g" / "gate.json").read_text())["evidence"]["failed"] == failed
    code3, _ = cli("report", "render", out / "results.jsonl", "--out", tmp_path / "rr", "--no-plots")
    assert code3 == 1


def test_a_plugin_writing_1_5x_the_output_fails(tmp_path, monkeypatch):
    (tmp_path / "scaled.py").write_text(textwrap.dedent("""
        from examples.plugin_backend import MyKernel

        class Scaled(MyKernel):
            name = "scaled"

            def run(self, inputs):
                out = super().run(inputs)
                out.o.mul_(1.5)
                return out

        def make():
            return Scaled()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT))
    code, text = _run("-b", "scaled:make", "-s", mini_suite(tmp_path, (1,)), "--no-isolate", "--out", tmp_path / "s")
    assert code == 1, text
    assert "o.in_floors" in text


def test_the_kill_table_through_run(tmp_path):
    """Every planted fault makes `gdncheck run` exit 1 on the faults suite; the clean twin exits 0
    over 20 seeds (the gate's proof, through the main job's own path)."""
    for name in sorted(F.FAULTS):
        code, text = _run("-b", f"fault-{name}", "-s", "faults", "--no-isolate", "--no-render",
                          "--out", tmp_path / name)
        assert code == 1, f"fault {name} passed `gdncheck run`:\n{text}"
    code, text = _run("-b", "twin-flashinfer", "-s", "faults", "--seeds", "20", "--no-isolate", "--no-render",
                      "--out", tmp_path / "clean")
    assert code == 0, text
    assert "120 planned, 120 judged" in text


# ---------------------------------------------------------------- 2. fresh by default

def test_each_run_gets_its_own_directory_and_old_runs_are_never_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    suite = mini_suite(tmp_path, (1,))
    for _ in range(2):
        code, text = _run("-b", EXACT, "-s", suite, "--no-isolate", "--no-render")
        assert code == 0, text
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(runs) == 2 and (tmp_path / "runs" / "latest").resolve() == runs[-1].resolve()
    code, text = _run("-b", EXACT, "-s", suite, "--no-isolate", "--out", runs[0])
    assert code == 2 and "already holds run" in text and "--resume" in text


def test_resume_refuses_a_changed_plugin(tmp_path, monkeypatch):
    plugin = tmp_path / "k2.py"
    plugin.write_text("from crashy_backend import Exact\n\ndef make():\n    return Exact()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    suite = mini_suite(tmp_path, (1,))
    out = tmp_path / "s"
    code, text = _run("-b", "k2:make", "-s", suite, "--no-isolate", "--no-render", "--out", out)
    assert code == 0, text
    code, text = _run("-b", "k2:make", "-s", suite, "--no-isolate", "--no-render", "--out", out, "--resume")
    assert code == 0, text  # same setup: resumes and has nothing left to run
    plugin.write_text(plugin.read_text() + "# edited kernel\n")
    code, text = _run("-b", "k2:make", "-s", suite, "--no-isolate", "--out", out, "--resume")
    assert code == 2 and "resume refused" in text and "backends" in text


def test_interrupt_keeps_results_prints_resume_and_leaves_no_old_report(tmp_path, monkeypatch):
    import gdncheck.run as R

    suite = mini_suite(tmp_path, (1, 2))
    out = tmp_path / "i"
    argv = ["run", "--device", "cpu", "--no-progress", "-b", EXACT, "-s", str(suite), "--no-isolate", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["gdncheck", *argv, "--overwrite"])  # what the resume line is made from
    code, _ = _run("-b", EXACT, "-s", suite, "--no-isolate", "--out", out)
    assert code == 0 and (out / "report.md").exists()
    real, n = R.run_case, [0]

    def stop_at_third(*a, **kw):
        n[0] += 1
        if n[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(R, "run_case", stop_at_third)
    code, text = _run("-b", EXACT, "-s", suite, "--no-isolate", "--out", out, "--overwrite")
    assert code == 130, text
    assert "2 of 6 planned pairs recorded" in text and "--resume" in text
    assert not (out / "report.md").exists()  # the older run's report is gone, the new one not written
    monkeypatch.setattr(R, "run_case", real)
    resume = shlex.split(text[text.index("continue with: ") + len("continue with: "):].splitlines()[0])
    assert resume[0] == "gdncheck" and "--resume" in resume
    code, text = cli(*resume[1:])
    assert code == 0, text
    assert len(load_results(out / "results.jsonl")[1]) == 6


def test_two_runs_cannot_share_a_directory(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with (out / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, text = _run("-b", EXACT, "-s", mini_suite(tmp_path, (1,)), "--out", out)
    assert code == 2 and "another gdncheck run" in text


# ---------------------------------------------------------------- 3. no pass on no evidence

def test_nothing_judged_is_never_a_pass(tmp_path):
    suite = mini_suite(tmp_path, (1,))
    code, text = cli("gate", "--device", "cpu", "--no-progress", "-b", "flashinfer-decode", "-s", suite,
                     "--out", tmp_path / "g")
    assert code == 3 and "nothing was judged" in text
    empty = tmp_path / "empty.toml"
    empty.write_text('description = "no cases"\n')
    code, text = cli("gate", "--device", "cpu", "--no-progress", "-b", EXACT, "-s", empty, "--out", tmp_path / "e")
    assert code == 3, text
    code, _ = cli("gate", "--device", "cpu", "--no-progress", "-b", EXACT, "-s", empty, "--out", tmp_path / "e2",
                  "--allow-empty")
    assert code == 0


def test_baselines_merges_and_cut_files_count_their_evidence(tmp_path):
    suite = mini_suite(tmp_path, (1, 2))
    base = tmp_path / "a"
    code, _ = _run("-b", EXACT, "-s", suite, "--no-isolate", "--no-render", "--out", base)
    assert code == 0
    other = tmp_path / "b"
    code, _ = _run("-b", "twin-fla", "-s", mini_suite(tmp_path / "x", (7,)) if (tmp_path / "x").mkdir() is None else None,
                   "--no-isolate", "--no-render", "--out", other)
    assert code == 0
    # a baseline that shares no pair with the run is refused, with the overlap named
    code, text = cli("gate", "--results", other / "results.jsonl", "--baseline", base / "results.jsonl",
                     "--out", tmp_path / "g1")
    assert code == 2 and "shares 0 of" in text
    # a results file cut by an interrupt: missing pairs fail the verdict and are named
    header, rs = load_results(base / "results.jsonl")
    cut = tmp_path / "cut.jsonl"
    write_results(cut, header, rs[:4])
    code, text = cli("gate", "--results", cut, "--out", tmp_path / "g2")
    assert code == 1 and "2 of 6 planned pairs have no result" in text and "missing" in text
    # shard 0 given twice and shard 1 missing: refused
    for i in (0, 1):
        _run("-b", EXACT, "-s", suite, "--no-isolate", "--no-render", "--shard", f"{i}/2", "--out", tmp_path / f"s{i}")
    s0 = tmp_path / "s0" / "results.jsonl"
    code, text = cli("report", "merge", s0, s0, "--out", tmp_path / "m.jsonl")
    assert code == 2 and "given twice" in text
    code, text = cli("report", "merge", s0, "--out", tmp_path / "m.jsonl")
    assert code == 2 and "1/2 missing" in text
    code, _ = cli("report", "merge", s0, tmp_path / "s1" / "results.jsonl", "--out", tmp_path / "m.jsonl")
    assert code == 0
    code, text = cli("gate", "--results", tmp_path / "m.jsonl", "--out", tmp_path / "g3")
    assert code == 0 and "6 planned, 6 judged" in text and "from shards 0/2, 1/2" in text


# ---------------------------------------------------------------- 5. errors: one line, the right code

def test_user_errors_are_one_line_with_exit_2(tmp_path, monkeypatch):
    (tmp_path / "raising.py").write_text("def make():\n    raise RuntimeError('no licence')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    suite = mini_suite(tmp_path, (1,))
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for args, needle in (
        (["-b", "raising:make"], "factory raised RuntimeError: no licence"),
        (["-b", "json:loads"], "backend 'json:loads'"),
        (["-b", EXACT, "--out", afile], "not a directory"),
        (["-b", EXACT, "--out", "/proc/gdncheck-out"], "cannot write there"),
        (["-b", EXACT, "--jobs", "0"], "--jobs"),
        (["-b", EXACT, "--shard", "2/2"], "--shard"),
    ):
        code, text = _run("-s", suite, *args)
        assert code == 2 and needle in text and "Traceback" not in text, (args, text)
    code, text = cli("ablate", "--beta-quant", "-s", suite, "-b", "twin-fla", "--out", "/proc/gdncheck-ablate")
    assert code == 2 and "Traceback" not in text


def test_version():
    code, text = cli("--version")
    assert code == 0 and text.startswith("gdncheck ")


# ---------------------------------------------------------------- 6. plugins as documented

def test_plugin_example_passes_padded_verify_and_repro_runs_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    suite = tmp_path / "verify.toml"  # the smoke suite's padded verify cases (caller_value policy)
    suite.write_text(textwrap.dedent("""
        [defaults]
        H = 2
        HV = 4
        K = 16
        V = 16
        [[case]]
        op = "verify"
        seqlens = [3, 3, 3]
        pool_size = 5
        read_indices = [1, -1, 3]
        intermediate = true
        matrix.seed = [1, 2]
        [[case]]
        op = "decode"
        seqlens = [1, 1]
        pool_size = 4
        read_indices = [-1, 2]
        seed = 3
    """))
    code, text = _run("-b", "examples.plugin_backend:make", "-s", suite, "--no-isolate", "--out", tmp_path / "p")
    assert code == 0, text
    rs = load_results(tmp_path / "p" / "results.jsonl")[1]
    assert all(r.repro.endswith("--backend examples.plugin_backend:make") for r in rs)
    code, text = cli(*shlex.split(rs[0].repro)[1:])
    assert code == 0, text


# ---------------------------------------------------------------- 7. reports explain

def test_reports_explain_and_read_in_a_log(tmp_path):
    out = tmp_path / "r"
    code, text = _run("-b", "fla-interp", "-b", EXACT, "-s", mini_suite(tmp_path, (1,)), "--no-isolate", "--out", out)
    assert code in (0, 3), text
    md = (out / "report.md").read_text()
    assert "Unsupported (not judged)" in md and "does not support intermediate states" in md
    assert "| metric | value | budget | headroom |" in md
    for line in text.splitlines():
        assert "[dim]" not in line and "[red]" not in line and "\r" not in line
        assert len(line) <= 100 or "/" in line, line  # only paths and repro lines run long
    code, text = cli("gate", "--device", "cpu", "--no-progress", "-b", "fault-final_state_not_written", "-s", "faults",
                     "--out", tmp_path / "g")
    assert code == 1 and "[dim]" not in text and "repro: gdncheck repro '" in text
