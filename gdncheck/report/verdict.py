"""A :class:`~gdncheck.data.verdict.Verdict` as plain text (terminals and CI logs, 80 columns,
no markup) and as Markdown (``gate.md``, ``$GITHUB_STEP_SUMMARY``)."""
from __future__ import annotations

import textwrap

from gdncheck.data.verdict import Finding, Verdict
from gdncheck.judge import fmt


def _wrap(text: str, indent: str = "    ", width: int = 80) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False) or [indent]


def finding_lines(i: int, f: Finding) -> list[str]:
    """A finding in a few lines: what broke, where, by how much, and its repro line in full."""
    head = f"{i}. {f.backend} | {f.case}" + (f" | {f.op}/{f.dtype}" if f.op else "")
    if f.kind in ("budget", "regression"):
        what = f"{f.check} = {fmt(f.value)}, limit {fmt(f.limit)} (x{fmt(f.severity)}); {f.detail}"
    else:
        what = f"{f.check}: {f.detail}"
    out = [head, *_wrap(what)]
    if f.repro:
        out.append(f"    repro: {f.repro}")  # whole, never wrapped: it must paste as one line
    return out


def evidence_lines(v: Verdict) -> list[str]:
    ev = v.evidence
    planned = "unknown (results file without a plan)" if ev.planned is None else str(ev.planned)
    out = [f"evidence: {planned} planned, {ev.judged} judged ({ev.passed} pass, {ev.failed} fail), "
           f"{ev.unsupported} unsupported, {len(ev.missing)} missing"
           + (f", from shards {', '.join(ev.shards)}" if ev.shards else "")]
    for b, reasons in ev.unsupported_reasons.items():
        out.append(f"  unsupported on {b}: {sum(reasons.values())}")
        for why, n in list(reasons.items())[:4]:
            out += _wrap(f"{n} x {why}", indent="    ")
        if len(reasons) > 4:
            out.append(f"    ... {len(reasons) - 4} more reasons")
    if ev.missing:
        out.append("  missing (planned, no result): " + ", ".join(f"{c}/{b}" for c, b in ev.missing[:6])
                   + (f" and {len(ev.missing) - 6} more" if len(ev.missing) > 6 else ""))
    if v.baseline is not None:
        bl = v.baseline
        out += _wrap(f"baseline {bl.path or ''}: {bl.compared} pairs compared ({bl.overlap:.0%} of judged), "
                     f"{bl.only_in_run} only in this run, {bl.only_in_baseline} only in the baseline, "
                     f"{bl.identical} identical; factor {bl.factor}", indent="")
    return out


def verdict_text(v: Verdict, *, limit: int = 20, title: str = "gdncheck") -> str:
    """The verdict for a terminal or a CI log: failures worst first with repro lines, regressions,
    improvements, known findings, evidence, then one line with the word and the exit code."""
    out: list[str] = []
    if v.failures:
        out.append(f"failures ({len(v.failures)}, worst first):")
        for i, f in enumerate(v.failures[:limit], 1):
            out += finding_lines(i, f)
        if len(v.failures) > limit:
            out.append(f"... {len(v.failures) - limit} more in the JSON verdict")
    if v.regressions:
        out.append(f"regressions against the baseline ({len(v.regressions)}):")
        for i, f in enumerate(v.regressions[:limit], 1):
            out += finding_lines(i, f)
    if v.improvements:
        out.append(f"improved against the baseline ({len(v.improvements)}):")
        for i, f in enumerate(v.improvements[:limit], 1):
            out.append(f"{i}. {f.backend} | {f.case}: {f.check} {f.detail}")
    if v.known:
        out.append("known findings (cases tagged finding:N):")
        for k in v.known:
            per = ", ".join(f"{b} {s}" for b, s in k.backends.items())
            out += _wrap(f"finding {k.finding}: {k.state} ({per})", indent="  ")
    out += evidence_lines(v)
    out += [f"note: {m}" for m in v.messages]
    ev = v.evidence
    out.append(f"{title}: {v.word} (exit {v.exit_code}): {ev.passed} pass, {ev.failed} fail, {ev.unsupported} "
               f"unsupported, {len(ev.missing)} missing"
               + (f"; {len(v.regressions)} regressions, {len(v.improvements)} improvements" if v.baseline else ""))
    return "\n".join(out)


def verdict_markdown(v: Verdict, *, title: str = "gdncheck", limit: int = 30) -> str:
    ev = v.evidence
    lines = [f"## {title}: {v.word} (exit {v.exit_code})", "",
             f"{ev.passed} pass, {ev.failed} fail, {ev.unsupported} unsupported, {len(ev.missing)} missing of "
             f"{ev.planned if ev.planned is not None else 'an unrecorded number of'} planned pairs"
             + (f"; {len(v.regressions)} regressions, {len(v.improvements)} improvements vs baseline "
                f"({v.baseline.compared} pairs compared)" if v.baseline else ""), ""]
    lines += [f"- {m}" for m in v.messages]

    def tab(head: str, rows: list[Finding]) -> None:
        lines.extend([f"### {head}", "", "| # | backend | case | op/dtype | check | value | limit | what |",
                      "|---|---|---|---|---|---|---|---|"])
        for i, f in enumerate(rows[:limit], 1):
            det = f.detail.replace("|", "\\|")
            lines.append(f"| {i} | {f.backend} | {f.case} | {f.op}/{f.dtype} | {f.check} | {fmt(f.value)} "
                         f"| {fmt(f.limit)} | {det} |")
        if len(rows) > limit:
            lines.append(f"\n... and {len(rows) - limit} more (JSON verdict)")
        lines.append("")

    if v.failures:
        tab("Failures (worst first)", v.failures)
        lines += ["Repro lines:", "", "```"] + [f.repro for f in v.failures[:limit] if f.repro] + ["```", ""]
    if v.regressions:
        tab("Regressions vs baseline", v.regressions)
    if v.improvements:
        tab("Improved vs baseline", v.improvements)
    if v.known:
        lines += ["### Known findings", "", "| finding | state | per backend | cases |", "|---|---|---|---|"]
        for k in v.known:
            lines.append(f"| {k.finding} | {k.state} | {', '.join(f'{b}: {s}' for b, s in k.backends.items())} "
                         f"| {', '.join(k.cases[:3])} |")
        lines.append("")
    if ev.unsupported_reasons:
        lines += ["### Unsupported (not judged)", "", "| backend | pairs | reason |", "|---|--:|---|"]
        for b, reasons in ev.unsupported_reasons.items():
            for why, n in reasons.items():
                lines.append(f"| {b} | {n} | {why.replace('|', '/')} |")
        lines.append("")
    if ev.missing:
        lines += ["### Missing (planned, no result)", ""] + [f"- {c} on {b}" for c, b in ev.missing[:50]] + [""]
    return "\n".join(lines) + "\n"
