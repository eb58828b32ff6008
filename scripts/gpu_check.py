"""Run the real-kernel backends on a fixed list of cases and record how each path behaves.

For every case: status (ok / unsupported / error), the path taken, output rel_l2 against the
float64 oracle next to the floor (rel_l2 of the oracle rounded to the output dtype), state and
intermediate rel_l2, untouched pool rows bit-identical, poisoned elements left unwritten, and
what padded rows did. One exception never stops the run; results are written after each case.

    PYTHONPATH=$PWD python scripts/gpu_check.py --out $OUT [--only SUBSTR ...] [--skip SUBSTR ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:  # installed (pip install -e) or aliased from the source tree
    import gdncheck_reference  # noqa: F401
except ImportError:
    import cases as _cases_pkg
    import reference as _ref_pkg
    sys.modules["gdncheck_reference"] = _ref_pkg
    sys.modules["gdncheck_cases"] = _cases_pkg

import torch  # noqa: E402

from gdncheck.backends.fla import FLAChunk, FLARecurrent  # noqa: E402
from gdncheck.backends.flashinfer import FlashInferDecode, FlashInferMTP, FlashInferPrefill  # noqa: E402
from gdncheck.cases import DTYPES, Case, materialize  # noqa: E402
from gdncheck.oracle import expected  # noqa: E402
from gdncheck_reference import OUT_CALLER, OUT_ORACLE, ROW_UNTOUCHED, ROW_WRITTEN  # noqa: E402

BIG_BASE = 4096  # slot 4096 at HV = 32, K = V = 128: element offset 2**31


def rel(x: torch.Tensor, ref: torch.Tensor) -> float | None:
    if ref.numel() == 0:
        return None
    x = x.double()
    d = torch.nan_to_num(x - ref, nan=float("inf"))
    n = ref.norm().item()
    return (d.norm().item() / n) if n > 0 else d.norm().item()


def floor(ref: torch.Tensor, dtype: torch.dtype) -> float | None:
    return rel(ref.to(dtype), ref) if ref.numel() else None


def build_cases():
    """(label, backend factory, Case, big-slot flag)."""
    M = dict(H=16, HV=32, K=128, V=128)
    L = []
    add = lambda label, be, big=False, **kw: L.append((label, be, Case(**{**M, **kw}), big))  # noqa: E731
    # ---- FlashInfer prefill: both routes, zero-length, pools, dtypes
    add("fi-prefill auto(chunk) plain fp32 zero-len", lambda: FlashInferPrefill("auto"),
        op="prefill", seqlens=[300, 0, 77], seed=1)
    add("fi-prefill cp=True plain fp32 zero-len", lambda: FlashInferPrefill(True),
        op="prefill", seqlens=[300, 0, 77], seed=1)
    add("fi-prefill auto(cp) pool fp32", lambda: FlashInferPrefill("auto"),
        op="prefill", seqlens=[200, 64], pool_size=16, read_indices=[5, 11], seed=2)
    add("fi-prefill cp=False pool fp32", lambda: FlashInferPrefill(False),
        op="prefill", seqlens=[200, 64], pool_size=16, read_indices=[5, 11], seed=2)
    add("fi-prefill chunk pool bf16 zero-len", lambda: FlashInferPrefill(False),
        op="prefill", seqlens=[130, 0, 1, 64], state_dtype="bfloat16", pool_size=16,
        read_indices=[3, 7, 1, 12], seed=3)
    add("fi-prefill cp pool strided fp32", lambda: FlashInferPrefill(True),
        op="prefill", seqlens=[100, 50, 20], pool_size=8, read_indices=[6, 2, 4], pool_strided=True, seed=4)
    add("fi-prefill chunk fp16 state fp16", lambda: FlashInferPrefill(False),
        op="prefill", seqlens=[90, 33], dtype="float16", state_dtype="float16", seed=5)
    add("fi-prefill chunk GQA H32/HV16", lambda: FlashInferPrefill(False),
        op="prefill", seqlens=[120, 40], H=32, HV=16, seed=6)
    add("fi-prefill chunk no-l2norm scale", lambda: FlashInferPrefill(False),
        op="prefill", seqlens=[70, 70], l2norm=False, qk_scale=0.08, scale=0.05, seed=7)
    # ---- FlashInfer decode (pretranspose)
    add("fi-decode fp32_t1 pool pad-1", FlashInferDecode,
        op="decode", seqlens=[1] * 4, gate_source="raw", pool_size=16, read_indices=[3, -1, 7, 0], seed=10)
    add("fi-decode fp32_t1 plain", FlashInferDecode, op="decode", seqlens=[1] * 3, gate_source="raw", seed=11)
    add("fi-decode fp32_t1 write-1 (probe)", FlashInferDecode,
        op="decode", seqlens=[1] * 3, gate_source="raw", pool_size=16, read_indices=[3, 5, 7],
        write_indices=[9, -1, 12], padding="skip", seed=12)
    add("fi-decode fp32_t1 fp16 io (probe)", FlashInferDecode,
        op="decode", seqlens=[1] * 3, dtype="float16", gate_dtype="float16", gate_source="raw", seed=13)
    add("fi-decode bf16_t1 pool pad-1", FlashInferDecode,
        op="decode", seqlens=[1] * 4, state_dtype="bfloat16", gate_source="raw", pool_size=16,
        read_indices=[3, -1, 7, 5], seed=14)
    add("fi-decode bf16_t1 pool write-idx strided", FlashInferDecode,
        op="decode", seqlens=[1] * 3, state_dtype="bfloat16", gate_source="raw", pool_size=16,
        read_indices=[3, 4, 7], write_indices=[8, 9, 10], pool_strided=True, gate_strided=True, seed=15)
    add("fi-decode bf16_mtp T4 intermediate", FlashInferDecode,
        op="verify", seqlens=[4] * 3, state_dtype="bfloat16", gate_source="raw", pool_size=16,
        read_indices=[2, 6, 9], intermediate=True, seed=16)
    add("fi-decode bf16_mtp wide_vec B4 T2 intermediate (probe)", FlashInferDecode,
        op="verify", seqlens=[2] * 4, state_dtype="bfloat16", gate_source="raw", pool_size=16,
        read_indices=[2, 6, 9, 11], intermediate=True, seed=19)
    add("fi-decode bf16_mtp T3 disable_update", FlashInferDecode,
        op="verify", seqlens=[3] * 2, state_dtype="bfloat16", gate_source="raw", pool_size=8,
        read_indices=[2, 5], disable_state_update=True, seed=17)
    add("fi-decode fp32_mtp T4 pad-1", FlashInferDecode,
        op="verify", seqlens=[4] * 3, gate_source="raw", pool_size=16, read_indices=[2, -1, 4],
        intermediate=True, seed=18)
    # ---- FlashInfer MTP
    add("fi-mtp buffer pad-1 write-1", FlashInferMTP,
        op="verify", seqlens=[4] * 3, gate_source="raw", pool_size=16, read_indices=[4, -1, 9],
        write_indices=[5, -1, -1], intermediate=True, seed=20)
    add("fi-mtp B8 T2 (B*HV>128) disable_update", FlashInferMTP,
        op="verify", seqlens=[2] * 8, gate_source="raw", pool_size=16,
        read_indices=[1, 2, 3, 4, 5, 6, 7, 8], intermediate=True, disable_state_update=True, seed=21)
    add("fi-mtp ssm_state_indices", lambda: FlashInferMTP("ssm"),
        op="verify", seqlens=[3] * 2, gate_source="raw", pool_size=8, read_indices=[1, 6],
        intermediate=True, seed=22)
    add("fi-mtp strided pool", FlashInferMTP,
        op="verify", seqlens=[3] * 2, gate_source="raw", pool_size=8, read_indices=[1, 6],
        write_indices=[2, 7], pool_strided=True, intermediate=True, seed=23)
    # ---- FLA
    add("fla-chunk prefill v_last precomp zero-len", FLAChunk,
        op="prefill", seqlens=[300, 0, 77], layout="v_last", seed=30)
    add("fla-chunk prefill k_last raw pool pad-1", FLAChunk,
        op="prefill", seqlens=[150, 40, 64], layout="k_last", gate_source="raw", pool_size=8,
        read_indices=[5, -1, 2], seed=31)
    add("fla-chunk prefill k_last precomp bf16 state", FLAChunk,
        op="prefill", seqlens=[100, 28], layout="k_last", state_dtype="bfloat16", seed=32)
    add("fla-chunk prefill v_last raw", FLAChunk,
        op="prefill", seqlens=[65, 129], layout="v_last", gate_source="raw", seed=33)
    add("fla-recurrent decode v_last raw pool pad-1", FLARecurrent,
        op="decode", seqlens=[1] * 4, layout="v_last", gate_source="raw", pool_size=8,
        read_indices=[3, -1, 6, 1], seed=34)
    add("fla-recurrent decode k_last precomp", FLARecurrent,
        op="decode", seqlens=[1] * 3, layout="k_last", seed=35)
    add("fla-recurrent verify k_last raw bf16 pool", FLARecurrent,
        op="verify", seqlens=[4] * 2, layout="k_last", gate_source="raw", state_dtype="bfloat16",
        pool_size=8, read_indices=[2, 7], seed=36)
    add("fla-recurrent prefill v_last precomp zero-len", FLARecurrent,
        op="prefill", seqlens=[50, 0, 7], layout="v_last", seed=37)
    # ---- slot >= 4096 at HV = 32 (int32 offset overflow); small pool mapped into a big one
    add("BIG fi-decode fp32_t1 slot>=4096", FlashInferDecode, big=True,
        op="decode", seqlens=[1] * 3, gate_source="raw", pool_size=8, read_indices=[1, 7, 3], seed=40)
    add("BIG fi-decode bf16_t1 slot>=4096", FlashInferDecode, big=True,
        op="decode", seqlens=[1] * 3, state_dtype="bfloat16", gate_source="raw", pool_size=8,
        read_indices=[1, 7, 3], seed=41)
    add("BIG fi-mtp slot>=4096", FlashInferMTP, big=True,
        op="verify", seqlens=[3] * 2, gate_source="raw", pool_size=8, read_indices=[7, 2],
        intermediate=True, seed=42)
    add("BIG fi-decode bf16_mtp slot>=4096", FlashInferDecode, big=True,
        op="verify", seqlens=[3] * 2, state_dtype="bfloat16", gate_source="raw", pool_size=8,
        read_indices=[7, 2], seed=43)
    add("BIG fi-prefill chunk slot>=4096", lambda: FlashInferPrefill(False), big=True,
        op="prefill", seqlens=[70, 20], pool_size=8, read_indices=[7, 2], seed=44)
    add("BIG fi-prefill cp slot>=4096", lambda: FlashInferPrefill(True), big=True,
        op="prefill", seqlens=[70, 20], pool_size=8, read_indices=[7, 2], seed=44)
    return L


def big_slot(s: int) -> int:
    return s if s < 0 else (0 if s == 0 else BIG_BASE + s)


def to_big(inp, P: int):
    """Inputs whose pool has BIG_BASE + P slots; small slot s >= 1 lives at BIG_BASE + s."""
    c = inp.case
    PB = BIG_BASE + P
    big = torch.zeros((PB, *inp.state.shape[1:]), dtype=inp.state.dtype, device=inp.state.device)
    big[0] = inp.state[0]
    big[BIG_BASE + 1:] = inp.state[1:]
    ri = [big_slot(s) for s in c.read_indices]
    wi = None if c.write_indices is None else [big_slot(s) for s in c.write_indices]
    bc = c.model_copy(update=dict(pool_size=PB, read_indices=ri, write_indices=wi))
    t = lambda x: None if x is None else torch.tensor(x, dtype=torch.int32, device=inp.state.device)  # noqa: E731
    return replace(inp, case=bc, state=big, read_indices=t(ri), write_indices=t(wi))


def from_big(pool: torch.Tensor, P: int) -> tuple[torch.Tensor, bool]:
    """Small-pool view of a big pool, and whether the slots in between stayed zero."""
    small = torch.cat([pool[:1], pool[BIG_BASE + 1:BIG_BASE + P]])
    gap_clean = bool((pool[1:BIG_BASE + 1] == 0).all().item())
    return small, gap_clean


def check(label, factory, case, big, dev):
    rec = dict(label=label, case_id=case.id, case=json.loads(case.model_dump_json(exclude_defaults=True)))
    be = factory()
    rec["backend"] = be.name
    why = be.available() or be.supports(case)
    if why:
        rec.update(status="unsupported", reason=why)
        return rec
    policy = be.policy(case)
    rec["policy"], rec["zero_length_policy"] = policy, be.zero_length_policy
    inp = materialize(case, dev)
    before = inp.clone()
    exp = expected(before, policy, be.zero_length_policy, device=dev)
    run_inp = to_big(inp, case.pool_size) if big else inp
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        out = be.run(run_inp)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - record and go on
        rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000],
                   traceback=traceback.format_exc()[-3000:], seconds=time.perf_counter() - t0)
        return rec
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec.update(status="ok", path=out.path, adapter_work=out.adapter_work)
    dt = DTYPES[case.dtype]
    # --- output
    o = out.o.to(dev)
    oc = exp.o_class
    m = oc == OUT_ORACLE
    ref = exp.o[m]
    got = o[m]
    rec["o_rel_l2"] = rel(got, ref)
    rec["o_floor"] = floor(ref, dt)
    rec["o_in_floors"] = (rec["o_rel_l2"] / rec["o_floor"]) if rec["o_rel_l2"] is not None and rec["o_floor"] else None
    rec["o_unwritten"] = int(torch.isnan(got).sum().item())
    rec["o_max_abs"] = float((got.double() - ref).abs().nan_to_num(float("inf")).max().item()) if ref.numel() else None
    cm = oc == OUT_CALLER
    if cm.any():  # caller_value: bit-identical to the caller's buffer (NaN poison stays NaN)
        a, b = o[cm], before.out[cm]
        rec["o_caller_kept"] = bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0), b.nan_to_num(0)))
    padded = case.padded_rows
    if padded:
        pads = {}
        for n in padded:
            sl = o[n] if case.op != "prefill" else None
            if sl is not None:
                pads[n] = ("nan" if torch.isnan(sl).all() else "zero" if (sl == 0).all() else
                           "partly-nan" if torch.isnan(sl).any() else "values")
        rec["padded_output"] = pads
    # --- state / pool
    pool = out.state
    gap_clean = None
    if big:
        pool, gap_clean = from_big(pool, case.pool_size)
        rec["big_gap_rows_untouched"] = gap_clean
    rc = exp.row_class
    w = rc == ROW_WRITTEN
    u = rc == ROW_UNTOUCHED
    if pool is not None:
        sdt = pool.dtype
        rec["state_rel_l2"] = rel(pool[w], exp.pool[w])
        rec["state_floor_out_dtype"] = floor(exp.pool[w], dt)
        rec["state_floor_state_dtype"] = floor(exp.pool[w], sdt)
        rec["state_unwritten"] = int(torch.isnan(pool[w]).sum().item())
        changed = [int(i) for i in torch.nonzero(u).flatten().tolist()
                   if not torch.equal(pool[i], before.state[i])]
        rec["untouched_rows"] = int(u.sum().item())
        rec["untouched_changed"] = changed
        # rows the oracle wants written but that still hold the input (a skipped write-back)
        rec["written_rows_unchanged"] = [int(i) for i in torch.nonzero(w).flatten().tolist()
                                         if torch.equal(pool[i], before.state[i])]
    # --- intermediate
    if case.intermediate and exp.intermediate is not None:
        if out.intermediate is None:
            rec["intermediate"] = "not returned"
        else:
            live = [n for n in range(case.B) if n not in padded]
            gi, ei = out.intermediate.to(dev)[live], exp.intermediate[live]
            rec["inter_rel_l2"] = rel(gi, ei)
            rec["inter_floor_out_dtype"] = floor(ei, dt)
            rec["inter_unwritten"] = int(torch.isnan(gi).sum().item())
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--exact", default=None, help="run only the case with this label (used for isolation)")
    ap.add_argument("--no-isolate", action="store_true", help="run BIG cases in this process")
    args = ap.parse_args(argv)
    dev = "cuda"
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name(0),
               capability=torch.cuda.get_device_capability())
    for pkg in ("flashinfer", "fla", "triton"):
        try:
            mod = __import__(pkg)
            env[pkg] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            env[pkg] = f"unimportable: {e}"
    print(json.dumps(env), flush=True)
    results = []
    for label, factory, case, big in build_cases():
        if args.exact is not None:
            if label != args.exact:
                continue
        elif args.only and not any(s in label for s in args.only):
            continue
        if any(s in label for s in args.skip):
            continue
        t0 = time.perf_counter()
        try:
            if big and args.exact is None and not args.no_isolate:
                # an illegal address poisons the CUDA context: one process per BIG case
                sub = outdir / ("sub_" + case.id)
                p = subprocess.run([sys.executable, __file__, "--exact", label, "--out", str(sub)],
                                   capture_output=True, text=True)
                try:
                    rec = json.loads((sub / "gpu_check.json").read_text())["results"][0]
                except (OSError, KeyError, IndexError, ValueError):
                    rec = dict(label=label, status="error", error=f"subprocess rc={p.returncode}: {p.stderr[-1500:]}")
                rec["isolated"] = True
                shutil.rmtree(sub, ignore_errors=True)
            else:
                rec = check(label, factory, case, big, dev)
        except Exception as e:  # noqa: BLE001
            rec = dict(label=label, status="error", error=f"harness: {type(e).__name__}: {e}",
                       traceback=traceback.format_exc()[-3000:])
        rec["wall"] = round(time.perf_counter() - t0, 2)
        results.append(rec)
        (outdir / "gpu_check.json").write_text(json.dumps(dict(env=env, results=results), indent=1, default=str))
        f = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
        extra = ""
        if rec.get("status") == "ok":
            extra = (f"o={f(rec.get('o_rel_l2'))} fl={f(rec.get('o_floor'))} st={f(rec.get('state_rel_l2'))} "
                     f"in={f(rec.get('inter_rel_l2'))} unw={rec.get('o_unwritten')}/{rec.get('state_unwritten')}"
                     f"/{rec.get('inter_unwritten', '-')} chg={rec.get('untouched_changed')} "
                     f"wsame={rec.get('written_rows_unchanged')} pad={rec.get('padded_output', '')} "
                     f"caller={rec.get('o_caller_kept', '-')} gap={rec.get('big_gap_rows_untouched', '-')} "
                     f"path={rec.get('path')}")
        else:
            extra = (rec.get("reason") or rec.get("error", ""))[:300]
        print(f"[{rec['wall']:6.1f}s] {rec.get('status', '?'):11s} {label}: {extra}", flush=True)
    ok = sum(r.get("status") == "ok" for r in results)
    print(f"done: {ok}/{len(results)} ok", flush=True)


if __name__ == "__main__":
    main()
