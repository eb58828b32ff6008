"""Render a results run: summary.json, report.md, report.html (plots inline), junit.xml."""
from __future__ import annotations

import html
import sys
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

from gdncheck.budgets import Budgets
from gdncheck.data.results import CaseResult, RunHeader
from gdncheck.data.verdict import Verdict
from gdncheck.judge import outcome
from gdncheck.report.summary import STATUSES, summarize
from gdncheck.report.verdict import verdict_markdown


def _f(v, spec: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def _stat(s: dict | None) -> str:
    return "–" if not s else f"{_f(s['median'])} / {_f(s['p99'])} / {_f(s['max'])}"


def _case_label(c: dict) -> str:
    return f"{c['backend']} · {c['op']} · {c['dtype']}/{c['state_dtype']} · {c['name'] or c['case_id']}"


# --------------------------------------------------------------------------- markdown

def markdown(summary: dict, verdict: Verdict, drift: list | None = None) -> str:
    """GitHub-flavoured Markdown (fine in a terminal and in ``$GITHUB_STEP_SUMMARY``)."""
    env = summary.get("environment", {})
    lines = [f"# gdncheck report: run `{summary['run_id']}`", ""]
    envs = ", ".join(f"{k} {v}" for k, v in env.items() if k in ("gpu", "torch", "triton", "flashinfer", "fla",
                                                                   "sglang", "vllm", "gdncheck", "git_rev") and v)
    lines += [f"Suites: {', '.join(summary['suites']) or '–'}. Backends: {', '.join(summary['backends']) or '–'}.",
              f"Environment: {envs or '–'}. Budgets: {', '.join(summary.get('budgets', [])) or 'shipped'}.", ""]
    lines += verdict_markdown(verdict, title="Verdict").splitlines() + [""]
    lines += ["## By backend, op, dtype", "",
              "In rounding floors (`rel_l2 / rel_l2(oracle rounded to dtype)`): median / p99 / max.", "",
              "| backend | op | dtype | pass | fail | unsup. | error | nan | crash | o | state | intermediate |",
              "|---|---|---|--:|--:|--:|--:|--:|--:|---|---|---|"]
    for g in summary["groups"]:
        c = g["counts"]
        lines.append(f"| {g['backend']} | {g['op']} | {g['dtype']} | {c['pass']} | {c['fail']} | {c['unsupported']} "
                     f"| {c['error']} | {c['nan']} | {c['crash']} | {_stat(g['o'])} | {_stat(g['state'])} "
                     f"| {_stat(g['intermediate'])} |")
    lines.append("")
    if summary.get("timing"):
        lines += ["## Time by backend", "",
                  "Compile: first call of each new compile key (T, heads, dims, dtypes, layout, scale) minus its run time. "
                  "Case wall: each case whole in its worker (inputs, kernel, oracle, twin, metrics)."
                  + (f" This run had {summary['jobs']} worker processes side by side: their times overlap "
                     "(the sums exceed the run's wall time) and include contention." if summary.get("jobs", 1) > 1 else ""),
                  "",
                  "| backend | cases run | compile keys | compile s | kernel run s | oracle s | case wall s |",
                  "|---|--:|--:|--:|--:|--:|--:|"]
        for tm in summary["timing"]:
            lines.append(f"| {tm['backend']} | {tm['cases_run']} | {tm['compile_keys']} | {tm['compile_s']:.1f} "
                         f"| {tm['run_s']:.2f} | {tm['oracle_s']:.1f} | {tm.get('wall_s', 0.0):.1f} |")
        lines.append("")
    if summary["failures"]:
        lines += [f"## Failed results ({len(summary['failures'])})", ""]
        for c in summary["failures"][:50]:
            lines += [f"- **{_case_label(c)}** (path `{c['path'] or '-'}`): {c['failure']}", "", "  ```",
                      f"  {c['repro']}", "  ```", ""]
        if len(summary["failures"]) > 50:
            lines += [f"... and {len(summary['failures']) - 50} more (summary.json).", ""]
    if summary["worst"]:
        lines += ["## Worst results beside their budgets", "",
                  "Each budgeted metric as value / budget (headroom = budget / value; below 1 fails). "
                  "A large value in floors can pass: fp32 states of chunked kernels sit at 1e4-1e5 fp32 floors "
                  "because bf16 products feed them, and their budget says so (budgets.toml).", "",
                  "| case | outcome | metric | value | budget | headroom |", "|---|---|---|--:|--:|--:|"]
        for c in summary["worst"]:
            for i, k in enumerate(c["checks"] or [{"metric": "-", "value": None, "budget": None, "headroom": None}]):
                label = f"{_case_label(c)}" if i == 0 else ""
                lines.append(f"| {label} | {c['outcome'] if i == 0 else ''} | {k['metric']} | {_f(k['value'])} "
                             f"| {_f(k['budget'])} | {_f(k['headroom'])} |")
        lines += ["", "Repro:", "", "```"] + [c["repro"] for c in summary["worst"]] + ["```", ""]
    for d in drift or []:
        lines += _drift_md(d)
    return "\n".join(lines)


def _drift_md(d) -> list[str]:
    out = []
    if d.position:
        out += ["## Error against position", "", "| backend | T | first bin | last bin | flip rate | status |",
                "|---|--:|--:|--:|--:|---|"]
        for c in d.position:
            first = c.rel_l2[0] if c.rel_l2 else None
            last = c.rel_l2[-1] if c.rel_l2 else None
            out.append(f"| {c.backend} | {c.T} | {_f(first)} | {_f(last)} | {_f(c.flip_rate, '.3%') if c.flip_rate is not None else '–'} "
                       f"| {c.status}{': ' + c.reason if c.reason else ''} |")
        out.append("")
    if d.rollout:
        out += ["## Rollouts", "", "Growth: slope of log(state error) against log(step).", "",
                "| backend | state | steps | final state err | one rounding | growth | output err | flip rate | status |",
                "|---|---|--:|--:|--:|--:|--:|--:|---|"]
        for c in d.rollout:
            fs = c.state_rel_l2[-1] if c.state_rel_l2 else None
            fl = c.state_floor[-1] if c.state_floor else None
            fo = c.o_rel_l2[-1] if c.o_rel_l2 else None
            out.append(f"| {c.backend} | {c.state_dtype} | {c.steps} | {_f(fs)} | {_f(fl)} | {_f(c.growth, '.2f')} "
                       f"| {_f(fo)} | {_f(c.flip_rate, '.3%') if c.flip_rate is not None else '–'} "
                       f"| {c.status}{': ' + c.reason if c.reason else ''} |")
        out.append("")
    return out


# --------------------------------------------------------------------------- html

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}code,pre{background:#f6f6f6;font-size:12px}pre{padding:6px;overflow-x:auto}
figure{display:inline-block;margin:8px;vertical-align:top}figcaption{font-size:12px;color:#444}
.fail{color:#b00}"""


def _md_table_to_html(md: str) -> str:
    """Minimal Markdown to HTML for the report's own Markdown (headings, tables, lists, code)."""
    out, in_table, in_code = [], False, False
    for line in md.splitlines():
        s = line.strip()
        if s.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(s))
            continue
        if s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if all(set(c) <= set("-:") for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if s.startswith("#"):
            n = len(s) - len(s.lstrip("#"))
            out.append(f"<h{n}>{_inline(s[n:].strip())}</h{n}>")
        elif s.startswith("- "):
            out.append(f"<p>• {_inline(s[2:])}</p>")
        elif s:
            out.append(f"<p>{_inline(s)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


def _inline(s: str) -> str:
    import re

    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def html_page(summary: dict, figures: list[tuple[str, str]], md: str) -> str:
    """Self-contained HTML: the Markdown's tables, then every figure as an inline PNG with its caption."""
    figs = "\n".join(
        f'<figure id="fig-{i}"><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}">'
        f"<figcaption>{html.escape(t)}</figcaption></figure>" for i, (t, b64) in enumerate(figures))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>gdncheck report {html.escape(summary['run_id'])}"
            f"</title><style>{_CSS}</style></head><body>\n{_md_table_to_html(md)}\n<h2>Plots</h2>\n{figs}\n</body></html>\n")


# --------------------------------------------------------------------------- junit

def junit(header: RunHeader, results: list[CaseResult], budgets: Budgets) -> str:
    """JUnit XML: one testsuite per backend, one testcase per (case, backend); a failure where the
    judge fails the result (status, contract or budget), skipped for unsupported."""
    from gdncheck.judge import judge_result

    root = ET.Element("testsuites", name=f"gdncheck {header.run_id}")
    by_backend: dict[str, list[CaseResult]] = {}
    for r in results:
        by_backend.setdefault(r.backend, []).append(r)
    for backend, rs in by_backend.items():
        suite = ET.SubElement(root, "testsuite", name=backend, tests=str(len(rs)),
                              failures=str(sum(outcome(r, budgets) == "fail" for r in rs)),
                              skipped=str(sum(outcome(r, budgets) == "unsupported" for r in rs)), errors="0")
        for r in rs:
            tc = ET.SubElement(suite, "testcase", classname=f"gdncheck.{backend}.{r.case.op}",
                               name=f"{r.case.name or r.case_id}[{r.case_id}]",
                               time=f"{(r.timing.run_s or 0.0):.4f}")
            found = judge_result(r, budgets)
            if r.status == "unsupported":
                ET.SubElement(tc, "skipped", message=r.reason or "unsupported")
            elif found:
                why = "; ".join(f"{f.check}: {f.detail}" for f in found)
                el = ET.SubElement(tc, "failure", message=why[:500], type=r.status)
                el.text = f"{why}\nrepro: {r.repro or r.case.repro()}"
            so = ET.SubElement(tc, "system-out")
            so.text = json.dumps({k: m.in_floors for k, m in r.metrics.items()}) + f"\n{r.repro or r.case.repro()}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --------------------------------------------------------------------------- render

@dataclass
class Rendered:
    """What :func:`render` wrote: file paths, the summary dict, and the plot captions."""

    summary: dict
    files: dict[str, Path] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)


def render(header: RunHeader, results: list[CaseResult], verdict: Verdict, budgets: Budgets, out: str | Path, *,
           drift: list | None = None, plots: bool = True) -> Rendered:
    """Write ``summary.json``, ``report.md``, ``report.html``, ``junit.xml`` and ``verdict.json`` into ``out``.

    Args:
        verdict: the judge's verdict over ``results`` (:func:`gdncheck.judge.judge_run`).
        drift: :class:`gdncheck.data.drift.DriftResult` objects to include (curves and tables).
        plots: False skips matplotlib (HTML without figures).
    """
    from gdncheck.report import plots as P

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(header, results, verdict, budgets)
    md = markdown(summary, verdict, drift)
    figs: list[tuple[str, str]] = []
    if plots:
        for title, fig in P.error_figures(results):
            figs.append((title, P.to_base64(fig)))
        for d in drift or []:
            for title, fig in P.drift_figures(d):
                figs.append((title, P.to_base64(fig)))
    files = {"summary": out / "summary.json", "markdown": out / "report.md", "html": out / "report.html",
             "junit": out / "junit.xml", "verdict": out / "verdict.json"}
    files["summary"].write_text(json.dumps(summary, indent=1, default=str) + "\n")
    files["markdown"].write_text(md + "\n")
    files["html"].write_text(html_page(summary, figs, md))
    files["junit"].write_text(junit(header, results, budgets))
    files["verdict"].write_text(verdict.model_dump_json(indent=1) + "\n")
    return Rendered(summary=summary, files=files, figures=[t for t, _ in figs])
