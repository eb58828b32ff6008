"""Markdown table of scripts/gpu_check.py records: python reports/h100/backends/summarize.py gpu_check.json > summary.md"""
import json
import sys


def f(x, fmt="{:.3g}"):
    return "–" if x is None else ("inf" if x == float("inf") else fmt.format(x))


def contracts(r):
    out = []
    if r.get("untouched_rows") is not None:
        ch = r.get("untouched_changed") or []
        out.append(f"untouched rows {r['untouched_rows']}" + (f", CHANGED {ch}" if ch else " intact"))
    if r.get("written_rows_unchanged"):
        out.append(f"rows not written {r['written_rows_unchanged']}")
    for k in ("o_unwritten", "state_unwritten", "inter_unwritten"):
        if r.get(k):
            out.append(f"{k.split('_')[0]} unwritten {r[k]}")
    if r.get("padded_output"):
        out.append("padded output " + ", ".join(f"row {k}: {v}" for k, v in r["padded_output"].items()))
    if r.get("o_caller_kept"):
        out.append("caller output kept")
    if "big_gap_rows_untouched" in r:
        out.append("gap rows untouched" if r["big_gap_rows_untouched"] else "GAP ROWS CHANGED")
    return "; ".join(out) or "–"


def main(path):
    d = json.load(open(path))
    env = d["env"]
    print(f"# Real-kernel backends on {env['device']} (SM{env['capability'][0]}{env['capability'][1]})\n")
    print(f"flashinfer {env['flashinfer']}, fla {env['fla']}, triton {env['triton']}, torch {env['torch']}. "
          f"Source: `{path}` ({d.get('note', '')}). Shapes: H=16, HV=32, K=V=128 unless the case says otherwise; "
          "bf16 io unless dtype says otherwise.\n")
    print("Output error in floors = rel_l2(o) / rel_l2(float64 oracle rounded to the output dtype). "
          "State and intermediate errors are plain rel_l2 against float64; their floor for comparison is the "
          "state dtype's rounding (fp32 ~2.5e-8, bf16 ~1.66e-3, fp16 ~2.1e-4).\n")
    print("| backend | case | path | policy | status | o (floors) | o rel_l2 | state rel_l2 | state floor (state dtype) | inter rel_l2 | contracts |")
    print("|---|---|---|---|---|--:|--:|--:|--:|--:|---|")
    for r in d["results"]:
        case = r.get("case", {})
        cs = ", ".join(f"{k}={v}" for k, v in case.items() if k != "seed")
        status = r["status"]
        if status != "ok":
            why = (r.get("reason") or r.get("error") or "").splitlines()[0][:90]
            status = f"**{status}**: {why}"
        print(f"| {r.get('backend', '–')} | {r['label']}<br><sub>{cs}</sub> | {r.get('path') or '–'} | {r.get('policy', '–')} | "
              f"{status} | {f(r.get('o_in_floors'), '{:.2f}')} | {f(r.get('o_rel_l2'))} | {f(r.get('state_rel_l2'))} | "
              f"{f(r.get('state_floor_state_dtype'))} | {f(r.get('inter_rel_l2'))} | {contracts(r)} |")


if __name__ == "__main__":
    main(sys.argv[1])
