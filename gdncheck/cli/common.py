"""Helpers shared by the commands: option parsing that fails with one line."""
from __future__ import annotations

from gdncheck.data.errors import UsageError


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    if shard is None:
        return None
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise UsageError(f"--shard: expected i/n (e.g. 0/4), got {shard!r}") from None
    if not 0 <= i < n:
        raise UsageError(f"--shard: need 0 <= i < n, got {shard!r}")
    return i, n


def backend_specs(specs: list[str] | None, device: str) -> list[str]:
    """Backend specs to run: the given ones (each loaded once, so a bad spec fails now) or the
    defaults for ``device``."""
    from gdncheck.backends import default_backends, load_backend

    specs = list(specs or default_backends(device.startswith("cuda")))
    for s in specs:
        load_backend(s)
    return specs


def resolve_device(device: str | None) -> str:
    from gdncheck.execute import default_device
    from gdncheck.run import check_device

    device = device or default_device()
    check_device(device)
    return device


def writable_dir(path) -> "Path":
    """``path`` created if needed and checked writable, or one :class:`UsageError` (before any work)."""
    import os
    from pathlib import Path

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--out {p}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {p}: cannot write there: {e.strerror or e}") from None
    if not os.access(p, os.W_OK):
        raise UsageError(f"--out {p}: not writable")
    return p


def judge_and_render(res_path, out, budgets, *, render: bool = True, drift=(), plots: bool = True,
                     allow_empty: bool = False, require=(), title: str = "gdncheck run"):
    """Judge a results file (:func:`gdncheck.judge.judge_run` with its header's plan), render the
    report into ``out`` (or only ``verdict.json``), print the verdict; ``(exit code, Rendered or None)``."""
    from gdncheck.cli import say
    from gdncheck.data.io import load_results
    from gdncheck.judge import judge_run
    from gdncheck.report.verdict import verdict_text

    header, results = load_results(res_path)
    v = judge_run(results, budgets, planned=header.planned, shards=header.shards, require=require,
                  allow_empty=allow_empty)
    r = None
    if render:
        from gdncheck.report.render import render as render_report
        r = render_report(header, results, v, budgets, out, drift=list(drift), plots=plots)
        say("wrote " + ", ".join(str(p) for p in r.files.values()) + f"; {len(r.figures)} plots")
    else:
        (out / "verdict.json").write_text(v.model_dump_json(indent=1) + "\n")
    say(verdict_text(v, title=title))
    return v.exit_code, r
