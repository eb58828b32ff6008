"""Explain why two kernels differ: attribute the A-B gap to rounding choices via precision twins.

``ablate`` answers the forward question (what does this rounding choice do); this module answers
the inverse one: two kernels disagree, which rounding choices explain it?

Algorithm:

1. Run A and B on the same cases and the same inputs (:func:`gdncheck.cases.materialize`, or
   outputs saved by an earlier run with :func:`save_outputs`, checked by inputs digest). Compare
   them on the elements the float64 oracle defines for both (padding policies may differ):
   output tokens, written state rows, intermediate states of live rows.
2. Measure A-B, A-oracle and B-oracle per channel in floors (rel-L2 over the oracle's norm,
   divided by the rel-L2 of the oracle rounded once to the channel's dtype) and in ULPs; where
   A-B lives: per value head, per position bin within the sequences, and the exponent of its
   growth with position.
3. Fit each kernel with a precision twin (:class:`gdncheck.backends.twins.FLATwin` with every
   knob of :data:`KNOB_GRID` explicit): coordinate-wise steepest descent from the family
   default (the kernel's declared twin; then from the other family, keeping the better fit).
   The fit score of a twin is the mean over (case, channel) of ``min(1, ||X - twin||^2 /
   ||X - oracle||^2)``: the share of the kernel's own error the twin fails to reproduce, so
   output (bf16) and state (fp32), bf16 and fp32 cases weigh alike. A move is taken only when it
   lowers the score and is decisive on some (case, channel) (:func:`_decisive`:
   :data:`DECISIVE` times closer by at least :data:`ABS_GAIN`, :data:`EXACT_GAIN` when
   reproduced exactly): knobs that change
   nothing, or only reshuffle the noise of another order of fp32 operations, are never picked.
4. The explanation is the set of knobs on which A's and B's best twins differ, after dropping
   those a fit can adopt from the other side with no (case, channel) getting decisively worse
   ("not observable on these cases").
5. Share explained, per channel: ``1 - ||(A - B) - (tA - tB)||^2 / ||A - B||^2`` (pooled over
   cases): the fraction of the gap's squared norm the twin pair reproduces. Squared rather than
   ``1 - ||..|| / ||A - B||`` so that the shares of switches acting on disjoint elements (one
   on prefill, one on decode) add up to the whole. With ``r = ||(A-B) - (tA-tB)|| / ||A-B||``:
   ``r <= 0.5`` (share >= 0.75) explained; ``r > 0.8`` (share < 0.36) not explained by rounding
   (a twin difference unrelated to the kernels' gives ``r >= 1``, share <= 0; ``r = 1`` exactly
   when both fits are the same configuration); in between partly explained. The verdict takes
   the worst channel where A and B differ. A and B bit-identical on every compared element:
   "no difference".

The search is cheap: one round costs one twin run per alternative knob value per case (11 with
:data:`KNOB_GRID`), twin outputs are cached per (configuration, case), and an exact fit (score 0)
stops at once.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from gdncheck.backends import Backend, BackendNotFound, load_backend
from gdncheck.backends.twins import FLATwin
from gdncheck.data.case import Case
from gdncheck.inputs import DTYPES, Inputs, inputs_digest, materialize
from gdncheck.metrics import bits_equal, token_rows, ulp_distance
from gdncheck.oracle import expected
from gdncheck_reference import OUT_ORACLE, ROW_WRITTEN

EXPLAIN_SCHEMA_VERSION = 1
F64 = torch.float64

#: knob -> values searched (the first is the FLA family default). ``inv_dtype`` None = the store dtype.
KNOB_GRID: dict[str, tuple] = {
    "beta_dtype": (None, "bfloat16"),
    "exp_dtype": ("float32", "bfloat16"),
    "l2norm_in_kernel": (True, False),
    "fast_math": (False, True),
    "raw_gate_math": ("float32", "exact"),
    "state_dtype": (None, "bfloat16"),
    "inv_dtype": (None, "float16", "float32"),
    "store_dtype": (None, "float32"),
    "per_step_state_round": (False, True),
    "bf16_output": (False, True),
}
FAMILIES: dict[str, dict] = {
    "twin-fla": {k: v[0] for k, v in KNOB_GRID.items()},
    "twin-flashinfer": {**{k: v[0] for k, v in KNOB_GRID.items()},
                        "inv_dtype": "float16", "per_step_state_round": True, "bf16_output": True},
}
#: what each knob's non-default value means, for verdicts ("B <phrase> and A does not")
KNOB_TEXT: dict[str, str] = {
    "beta_dtype": "rounds beta to {v}",
    "exp_dtype": "evaluates exp(g) in {v}",
    "l2norm_in_kernel": "normalises q/k outside the kernel (rounded to the input dtype)",
    "fast_math": "uses fast-math exp/log (__expf/__logf)",
    "raw_gate_math": "gets exactly rounded gates instead of computing them from raw a, b in fp32",
    "state_dtype": "holds the state in {v} between calls",
    "inv_dtype": "holds (I+A)^-1 in {v}",
    "store_dtype": "keeps chunk intermediates in {v}",
    "per_step_state_round": "rounds a low-precision state after every token",
    "bf16_output": "computes decode/verify output in bf16 (fp16 inputs)",
}
DECISIVE = 2.0  # factor by which a move must bring some (case, channel) closer (see _decisive)
ABS_GAIN = 0.01  # ... and by at least this share of the kernel's error energy there
EXACT_GAIN = 1e-4  # ... or this much when the closer twin reproduces it bit for bit
EXPLAINED_MAX_RESIDUAL = 0.5
NOT_EXPLAINED_MIN_RESIDUAL = 0.8
CHANNELS = ("o", "state", "intermediate")
POSITION_BINS = 8

Verdict = Literal["no difference", "explained", "partly explained", "not explained", "nothing compared"]


# ============================================================================ report data

class ChannelStats(BaseModel):
    """Distances of one channel (o, state or intermediate), pooled over cases or for one case."""

    count: int = 0
    dtype: str = ""
    ab_floors: float | None = Field(None, description="rel_l2(A, B) over the oracle norm / floor")
    a_floors: float | None = Field(None, description="A vs oracle in floors")
    b_floors: float | None = Field(None, description="B vs oracle in floors")
    floor_rel_l2: float | None = None
    identical: float | None = Field(None, description="fraction of elements A and B hold bit-identically")
    within_1ulp: float | None = None
    ab_ulp_p99: float | None = None
    ab_ulp_max: float | None = None
    a_ulp_max: float | None = None
    b_ulp_max: float | None = None
    share: float | None = Field(None, description="1 - ||(A-B) - (tA-tB)||^2 / ||A-B||^2")


class Where(BaseModel):
    """Where A and B differ on the output."""

    heads: list[float] = Field(default_factory=list, description="A-B per value head, in floors")
    bin_edges: list[int] = Field(default_factory=list, description="position-in-sequence bins (tokens)")
    bins_ab: list[float] = Field(default_factory=list, description="A-B per bin, in floors")
    bins_a: list[float] = Field(default_factory=list, description="A vs oracle per bin, in floors")
    bins_b: list[float] = Field(default_factory=list)
    growth: float | None = Field(None, description="slope of log(A-B) vs log(bin centre): ~0 flat, 1 linear growth")
    tokens_differing: float | None = Field(None, description="fraction of output tokens with any A-B difference")


class Fit(BaseModel):
    """A kernel's best precision twin."""

    knobs: dict[str, Any]
    start: str = Field(description="family the winning search started from")
    score: float = Field(description="mean over (case, channel) of ||X - twin||^2 / ||X - oracle||^2")
    identical: float | None = Field(None, description="fraction of output elements bit-identical to the twin")
    within_1ulp: float | None = None
    residual_floors: float | None = Field(None, description="rel_l2(X, twin) over the oracle norm, in floors (output)")
    evaluations: int = 0


class CaseRow(BaseModel):
    case_id: str
    label: str
    op: str
    dtype: str
    state_dtype: str
    channels: dict[str, ChannelStats] = Field(default_factory=dict)


class Skipped(BaseModel):
    case_id: str
    label: str
    reason: str


class Explanation(BaseModel):
    """The whole answer for one pair."""

    schema_version: int = EXPLAIN_SCHEMA_VERSION
    a: str
    b: str
    a_version: str = ""
    b_version: str = ""
    device: str = ""
    verdict: Verdict
    summary: str
    switches: list[dict] = Field(default_factory=list, description="knob, A's value, B's value, phrase")
    not_observable: list[str] = Field(default_factory=list, description="knobs the fits differ on that no case shows")
    share: float | None = Field(None, description="share of the A-B gap the twin pair reproduces (headline channel)")
    headline: str | None = None
    channels: dict[str, ChannelStats] = Field(default_factory=dict)
    where: Where = Field(default_factory=Where)
    fit_a: Fit | None = None
    fit_b: Fit | None = None
    cases: list[CaseRow] = Field(default_factory=list)
    skipped: list[Skipped] = Field(default_factory=list)
    search: str = ""
    thresholds: dict[str, float] = Field(default_factory=lambda: {
        "explained_max_residual": EXPLAINED_MAX_RESIDUAL, "not_explained_min_residual": NOT_EXPLAINED_MIN_RESIDUAL,
        "decisive": DECISIVE, "abs_gain": ABS_GAIN, "exact_gain": EXACT_GAIN})
    seconds: float | None = None


# ============================================================================ sides

@dataclass
class Side:
    """One kernel of the pair: a live backend or outputs saved by :func:`save_outputs`."""

    name: str
    version: str
    family_twin: str
    backend: Backend | None = None
    saved: Path | None = None
    saved_index: dict = field(default_factory=dict)
    zero_length_policy: str = "passthrough"

    def policy(self, case: Case) -> str:
        if self.backend is not None:
            return self.backend.policy(case)
        return self.saved_index["cases"][case.id]["policy"]


def _family_of(b: Backend) -> str:
    tw = getattr(b, "twin", None)
    return tw if tw in FAMILIES else "twin-fla"


def parse_spec(spec: str) -> Backend:
    """A backend by spec; ``twin-fla[beta_dtype=bfloat16,fast_math=true]`` sets twin knobs."""
    name, knobs = spec, {}
    if spec.endswith("]") and "[" in spec:
        name, _, rest = spec[:-1].partition("[")
        for item in filter(None, rest.split(",")):
            k, sep, v = item.partition("=")
            if not sep:
                raise BackendNotFound(f"backend {spec!r}: knob {item!r} needs key=value")
            knobs[k.strip()] = _parse_value(v.strip())
    b = load_backend(name)
    if knobs:
        try:
            b = type(b)(**knobs)
        except (TypeError, ValueError) as e:
            raise BackendNotFound(f"backend {spec!r}: {e}") from None
        b.name = spec
    return b


def _parse_value(v: str):
    low = v.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    return v


def open_side(spec: str) -> Side:
    """A backend spec, or a directory written by :func:`save_outputs`."""
    p = Path(spec)
    if p.is_dir() and (p / "index.json").exists():
        idx = json.loads((p / "index.json").read_text())
        return Side(name=idx["backend"], version=idx.get("version", ""), family_twin=idx.get("twin") or "twin-fla",
                    saved=p, saved_index=idx, zero_length_policy=idx.get("zero_length_policy", "passthrough"))
    b = parse_spec(spec)
    return Side(name=b.name, version=b.version(), family_twin=_family_of(b), backend=b,
                zero_length_policy=b.zero_length_policy)


# ============================================================================ cases

def default_cases(K: int = 32, V: int = 32, seeds: int = 1) -> list[Case]:
    """Small cases on which every knob of :data:`KNOB_GRID` is observable by some case.

    prefill crossing a chunk (inverse and store dtypes; bf16 and fp16 inputs), four chunks (growth
    with position), prefill with raw gates, decode bf16/fp16 with raw gates (l2norm placement, fast math, output in bf16), verify
    with an fp32 pool with and without intermediate states (kernels without them), verify with a bf16 pool (per-step state
    rounding), fp32 inputs (fast math and gate arithmetic stand above the floor). GVA (HV = 2H)
    everywhere. ``seeds`` replicates each case with other seeds.
    """
    common = dict(H=2, HV=4, K=K, V=V, tags=["explain"])
    base = [
        Case(name="explain/prefill/bf16", op="prefill", seqlens=[70, 9], seed=1, **common),
        Case(name="explain/prefill/fp16", op="prefill", seqlens=[66], dtype="float16", gate_dtype="float16",
             seed=2, **common),
        Case(name="explain/prefill/raw", op="prefill", seqlens=[12, 5], gate_source="raw", seed=3, **common),
        Case(name="explain/prefill/4-chunks", op="prefill", seqlens=[256], seed=11, **common),
        Case(name="explain/decode/bf16", op="decode", seqlens=[1] * 4, gate_source="raw", seed=4, **common),
        Case(name="explain/decode/fp16", op="decode", seqlens=[1] * 4, dtype="float16", gate_dtype="float16",
             gate_source="raw", seed=5, **common),
        Case(name="explain/decode/bf16-state", op="decode", seqlens=[1] * 3, state_dtype="bfloat16",
             gate_source="raw", seed=6, **common),
        Case(name="explain/verify/fp32-pool", op="verify", seqlens=[4] * 2, gate_source="raw", intermediate=True,
             pool_size=4, read_indices=[1, 2], seed=7, **common),
        Case(name="explain/verify/fp32-pool-no-inter", op="verify", seqlens=[3] * 2, gate_source="raw",
             pool_size=4, read_indices=[2, 0], seed=12, **common),
        Case(name="explain/verify/bf16-pool", op="verify", seqlens=[4] * 2, state_dtype="bfloat16",
             gate_source="raw", intermediate=True, pool_size=4, read_indices=[1, 2], seed=8, **common),
        Case(name="explain/verify/fp16", op="verify", seqlens=[3] * 2, dtype="float16", gate_dtype="float16",
             gate_source="raw", seed=9, **common),
        Case(name="explain/verify/fp32-io", op="verify", seqlens=[3] * 2, dtype="float32", gate_source="raw",
             seed=10, **common),
    ]
    return replicate(base, seeds)


def replicate(cases: list[Case], seeds: int) -> list[Case]:
    """Each case with ``seeds`` seeds: its own, then ``seed + 7919 * i``."""
    return [c if i == 0 else c.model_copy(update={"seed": c.seed + 7919 * i})
            for c in cases for i in range(max(1, seeds))]


# ============================================================================ per-case context

@dataclass(eq=False)
class Ctx:
    """One case: the inputs, the oracle under both policies, masks, and the channel views."""

    case: Case
    inputs: Inputs
    ref: dict[str, torch.Tensor]  # channel -> float64 oracle values, selected
    tok_mask: torch.Tensor  # [B, T] output tokens both oracles define
    row_mask: torch.Tensor | None  # [P] state rows both write
    live: torch.Tensor | None  # [B, T] tokens of live rows (intermediate)
    pos: torch.Tensor  # [ntok] position within its sequence of each selected output token
    dtypes: dict[str, torch.dtype]
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: dict[str, torch.Tensor] = field(default_factory=dict)


def _select(out_o, state, inter, ctx: Ctx) -> dict[str, torch.Tensor]:
    """Channel tensors (native dtypes, on the CPU): o ``[ntok, HS, V]``, state ``[rows, HS, ..]``,
    intermediate ``[ntok_live, HS, ..]``."""
    ch = {"o": out_o.detach().cpu()[ctx.tok_mask]}
    if ctx.row_mask is not None and state is not None:
        ch["state"] = state.detach().cpu()[ctx.row_mask]
    if ctx.live is not None and inter is not None:
        ch["intermediate"] = inter.detach().cpu()[ctx.live]
    return {k: v for k, v in ch.items() if v.numel()}


def _context(case: Case, inputs: Inputs, pol_a: str, zl_a: str, pol_b: str, zl_b: str) -> Ctx:
    ea = expected(inputs, pol_a, zl_a, device="cpu")
    eb = ea if (pol_a, zl_a) == (pol_b, zl_b) else expected(inputs, pol_b, zl_b, device="cpu")
    tok = (ea.o_class == OUT_ORACLE) & (eb.o_class == OUT_ORACLE)
    rows = (ea.row_class == ROW_WRITTEN) & (eb.row_class == ROW_WRITTEN)
    live = None
    if case.intermediate and ea.intermediate is not None:
        live = torch.ones(case.B, case.T, dtype=torch.bool)
        for n in case.padded_rows:
            b, sl = token_rows(inputs)[n]
            live[b, sl] = False
    pos = torch.zeros(case.B, case.T, dtype=torch.long)
    for b, sl in token_rows(inputs):
        pos[b, sl] = torch.arange(sl.stop - sl.start)
    ctx = Ctx(case=case, inputs=inputs, ref={}, tok_mask=tok, row_mask=rows if rows.any() else None, live=live,
              pos=pos[tok], dtypes={"o": DTYPES[case.dtype], "state": DTYPES[case.state_dtype],
                                    "intermediate": torch.float32})
    ctx.ref = {k: v.to(F64) for k, v in _select(ea.o, ea.pool, ea.intermediate, ctx).items()}
    return ctx


# ============================================================================ twins and fits

def _key(cfg: dict) -> tuple:
    return tuple(cfg[k] for k in KNOB_GRID)


class Fitter:
    """Runs twin configurations on the cases (cached) and scores them against a kernel."""

    def __init__(self, ctxs: list[Ctx], device: str = "cpu"):
        self.ctxs = ctxs
        self.device = device  # where the twins run (the kernels' device: a GPU fits in seconds)
        self.cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.ratios: dict[tuple, list[float]] = {}
        self.runs = 0

    def twin_out(self, cfg: dict, i: int, policy: tuple[str, str]) -> dict[str, torch.Tensor]:
        key = (_key(cfg), i, policy)
        if key not in self.cache:
            ctx = self.ctxs[i]
            tw = FLATwin(padding={ctx.case.op: policy[0]}, **cfg)
            tw.zero_length_policy = policy[1]
            out = tw.run(ctx.inputs.clone(self.device))
            self.cache[key] = _select(out.o, out.state, out.intermediate, ctx)
            self.runs += 1
        return self.cache[key]


def _ratios(fitter: Fitter, cfg: dict, side: str, pols: list[tuple[str, str]]) -> list[float]:
    """Per (case, channel): ``||X - T||^2 / ||X - R||^2``, the share of the kernel's own error
    (X against the oracle R) that the twin T does not reproduce. Per case, so that an fp32 case
    is not swamped by the larger errors of bf16 ones."""
    key = (_key(cfg), side)
    if key in fitter.ratios:
        return fitter.ratios[key]
    out = []
    for i, ctx in enumerate(fitter.ctxs):
        x = getattr(ctx, side)
        tw = fitter.twin_out(cfg, i, pols[i])
        for c in CHANNELS:
            if c not in x or c not in tw:
                continue
            x64, r = x[c].to(F64), ctx.ref[c]
            num = float(((x64 - tw[c].to(F64)) ** 2).sum())
            den = float(((x64 - r) ** 2).sum())
            # capped at 1: a twin further from X than the oracle reproduces none of X's error
            # there, however far it is (noise of another fp32 order must not dominate the mean)
            out.append(0.0 if num == 0 else min(1.0, num / max(den, 1e-30 * float((r ** 2).sum()), 1e-300)))
    fitter.ratios[key] = out
    return out


def _score(fitter: Fitter, cfg: dict, side: str, pols: list[tuple[str, str]]) -> float:
    """The fit score: mean of :func:`_ratios` (0 = the twin reproduces the kernel exactly)."""
    r = _ratios(fitter, cfg, side, pols)
    return sum(r) / len(r) if r else 0.0


def _decisive(better: list[float], worse: list[float]) -> bool:
    """Some (case, channel) is at least DECISIVE times closer under ``better`` and by at least
    ABS_GAIN of the kernel's error energy there (EXACT_GAIN when ``better`` reproduces it
    exactly): a rounding switch acts on the elements it touches far above the noise of a
    different order of fp32 operations, which reshuffles a few 1-ulp flips (ratios ~1e-11 to
    1e-3, a single flip of 1e4 elements ~1e-7) or leaves the twin further from the kernel than
    the oracle is (ratio capped at 1)."""
    return any(w >= DECISIVE * b and w - b >= (EXACT_GAIN if b == 0 else ABS_GAIN) for b, w in zip(better, worse))


def fit(fitter: Fitter, side: str, pols: list[tuple[str, str]], start: str,
        max_rounds: int = 4) -> tuple[dict, float, int, str]:
    """Coordinate-wise steepest descent from the family ``start``, then from the other family
    when the first did not reproduce the kernel exactly. A move is taken when it lowers the
    score and is decisive on some (case, channel) (:func:`_decisive`); the best such move wins.
    Returns ``(knobs, score, evals, start)``."""
    evals = 0

    def descend(cfg: dict) -> tuple[dict, float]:
        nonlocal evals
        s = _score(fitter, cfg, side, pols)
        evals += 1
        for _ in range(max_rounds):
            if s == 0:
                break
            cur = _ratios(fitter, cfg, side, pols)
            best, best_s = None, s
            for k, vals in KNOB_GRID.items():
                for v in vals:
                    if v == cfg[k]:
                        continue
                    cand = {**cfg, k: v}
                    sc = _score(fitter, cand, side, pols)
                    evals += 1
                    if sc < best_s and _decisive(_ratios(fitter, cand, side, pols), cur):
                        best, best_s = cand, sc
            if best is None:
                break
            cfg, s = best, best_s
        return cfg, s

    cfg, s = descend(dict(FAMILIES[start]))
    won = start
    if s > 0:
        other = next(f for f in FAMILIES if f != start)
        cfg2, s2 = descend(dict(FAMILIES[other]))
        if s2 < s and _decisive(_ratios(fitter, cfg2, side, pols), _ratios(fitter, cfg, side, pols)):
            cfg, s, won = cfg2, s2, other
    return cfg, s, evals, won


def _fit_quality(fitter: Fitter, cfg: dict, side: str, pols) -> tuple[float | None, float | None, float | None]:
    """Output: fraction bit-identical to the twin, within 1 ULP, residual rel-L2 in floors."""
    n = same = one = 0
    num = rsq = fsq = 0.0
    for i, ctx in enumerate(fitter.ctxs):
        x = getattr(ctx, side).get("o")
        if x is None:
            continue
        t = fitter.twin_out(cfg, i, pols[i])["o"]
        dt = ctx.dtypes["o"]
        n += x.numel()
        same += int(bits_equal(x.to(dt), t.to(dt)).sum())
        one += int((ulp_distance(x, t.to(F64), dt) <= 1).sum())
        num += float(((x.to(F64) - t.to(F64)) ** 2).sum())
        r = ctx.ref["o"]
        rsq += float((r ** 2).sum())
        fsq += float(((r.to(dt).to(F64) - r) ** 2).sum())
    if n == 0:
        return None, None, None
    fl = math.sqrt(fsq / rsq) if rsq else 0.0
    res = math.sqrt(num / rsq) / fl if rsq and fl else 0.0
    return same / n, one / n, res


def _simplify(fitter: Fitter, ca: dict, cb: dict, pa, pb) -> tuple[dict, dict, list[str]]:
    """Drop differences no case shows: where one fit can take the other's value with no
    (case, channel) getting decisively worse, it does. Returns the new configs and the knobs dropped."""
    def no_worse(side, pols, cur, trial) -> bool:
        return not _decisive(_ratios(fitter, cur, side, pols), _ratios(fitter, trial, side, pols))

    dropped = []
    for k in KNOB_GRID:
        if ca[k] == cb[k]:
            continue
        trial_b, trial_a = {**cb, k: ca[k]}, {**ca, k: cb[k]}
        if no_worse("b", pb, cb, trial_b):
            cb = trial_b
        elif no_worse("a", pa, ca, trial_a):
            ca = trial_a
        else:
            continue
        dropped.append(k)
    return ca, cb, dropped


# ============================================================================ distances

@dataclass
class _Acc:
    n: int = 0
    same: int = 0
    one: int = 0
    ab: float = 0.0
    ea: float = 0.0
    eb: float = 0.0
    ref: float = 0.0
    flo: float = 0.0
    resid: float = 0.0
    ulps: list = field(default_factory=list)
    a_ulp_max: float = 0.0
    b_ulp_max: float = 0.0
    dtype: str = ""

    def add(self, a, b, r, dt, ta=None, tb=None):
        a64, b64 = a.to(F64), b.to(F64)
        self.n += a.numel()
        self.same += int(bits_equal(a.to(dt), b.to(dt)).sum())
        u = ulp_distance(a, b64, dt)
        self.one += int((u <= 1).sum())
        self.ulps.append(u.reshape(-1))
        self.a_ulp_max = max(self.a_ulp_max, float(ulp_distance(a, r, dt).max()))
        self.b_ulp_max = max(self.b_ulp_max, float(ulp_distance(b, r, dt).max()))
        self.ab += float(((a64 - b64) ** 2).sum())
        self.ea += float(((a64 - r) ** 2).sum())
        self.eb += float(((b64 - r) ** 2).sum())
        self.ref += float((r ** 2).sum())
        self.flo += float(((r.to(dt).to(F64) - r) ** 2).sum())
        if ta is not None:
            self.resid += float((((a64 - b64) - (ta.to(F64) - tb.to(F64))) ** 2).sum())
        name = str(dt).removeprefix("torch.")
        self.dtype = name if self.dtype in ("", name) else "mixed"

    def stats(self) -> ChannelStats:
        if self.n == 0:
            return ChannelStats()
        fl = math.sqrt(self.flo / self.ref) if self.ref else 0.0

        def fl_(x):
            if not self.ref:
                return 0.0
            return math.sqrt(x / self.ref) / fl if fl else (0.0 if x == 0 else math.inf)

        u = torch.cat(self.ulps).to(torch.float64)
        share = None
        if self.ab > 0:
            share = 1.0 - self.resid / self.ab
        return ChannelStats(count=self.n, dtype=self.dtype, ab_floors=fl_(self.ab), a_floors=fl_(self.ea),
                            b_floors=fl_(self.eb), floor_rel_l2=fl, identical=self.same / self.n,
                            within_1ulp=self.one / self.n, ab_ulp_p99=float(torch.quantile(u[:1 << 24], 0.99)),
                            ab_ulp_max=float(u.max()), a_ulp_max=self.a_ulp_max, b_ulp_max=self.b_ulp_max,
                            share=share)


def _where(ctxs: list[Ctx]) -> Where:
    """A-B on the output per value head and per position bin (in floors of that head / bin).

    Positions are token indices within their sequence; when prefill cases are present only they
    enter the position bins (decode and verify tokens sit at positions 0..T-1 of other calls)."""
    outs = [c for c in ctxs if "o" in c.a and "o" in c.b]
    if not outs:
        return Where()
    pre = [c for c in outs if c.case.op == "prefill"]
    HS = max(c.ref["o"].shape[1] for c in outs)
    binned = pre or outs
    tmax = max((int(c.pos.max()) + 1 for c in binned if c.pos.numel()), default=1)
    nb = min(POSITION_BINS, tmax)
    edges = [round(i * tmax / nb) for i in range(nb + 1)]
    h = {k: torch.zeros(HS, dtype=F64) for k in ("ab", "ref", "flo")}
    bins = {k: torch.zeros(nb, dtype=F64) for k in ("ab", "a", "b", "ref", "flo")}
    tok_diff = tok_n = 0
    for c in outs:
        a, b, r = c.a["o"].to(F64), c.b["o"].to(F64), c.ref["o"]
        dt = c.dtypes["o"]
        fl = (r.to(dt).to(F64) - r) ** 2
        hs = r.shape[1]
        h["ab"][:hs] += ((a - b) ** 2).sum((0, 2))
        h["ref"][:hs] += (r ** 2).sum((0, 2))
        h["flo"][:hs] += fl.sum((0, 2))
        if any(c is x for x in binned):
            bi = torch.bucketize(c.pos, torch.tensor(edges[1:-1]), right=True)
            for key, val in (("ab", (a - b) ** 2), ("a", (a - r) ** 2), ("b", (b - r) ** 2), ("ref", r ** 2),
                             ("flo", fl)):
                bins[key].index_add_(0, bi, val.sum((1, 2)))
        tok_diff += int((~bits_equal(c.a["o"], c.b["o"].to(c.a["o"].dtype))).flatten(1).any(1).sum())
        tok_n += a.shape[0]

    def floors(x, flo):
        return [math.sqrt(float(v / f)) if f > 0 else 0.0 for v, f in zip(x, flo)]

    w = Where(heads=floors(h["ab"], h["flo"]), bin_edges=edges, bins_ab=floors(bins["ab"], bins["flo"]),
              bins_a=floors(bins["a"], bins["flo"]), bins_b=floors(bins["b"], bins["flo"]),
              tokens_differing=tok_diff / tok_n if tok_n else None)
    pts = [(math.log((edges[i] + edges[i + 1]) / 2 + 0.5), math.log(v))
           for i, v in enumerate(w.bins_ab) if v > 0 and bins["ref"][i] > 0]
    if len(pts) >= 3:
        mx = sum(p[0] for p in pts) / len(pts)
        my = sum(p[1] for p in pts) / len(pts)
        sxx = sum((p[0] - mx) ** 2 for p in pts)
        w.growth = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None
    return w


# ============================================================================ run

def _run_side(side: Side, inputs: Inputs) -> tuple[dict | None, str | None]:
    """``({"o", "state", "intermediate"}, None)`` or ``(None, reason)``."""
    case = inputs.case
    if side.backend is not None:
        from gdncheck.execute import run_inputs

        res, out = run_inputs(side.backend, inputs)
        if out is None:
            return None, f"{side.name}: {res.status}: {res.reason}"
        return {"o": out.o, "state": out.state, "intermediate": out.intermediate}, None
    entry = side.saved_index["cases"].get(case.id)
    if entry is None:
        return None, f"{side.name}: not in the saved outputs"
    if entry.get("status", "ok") != "ok":
        return None, f"{side.name}: {entry.get('status')}: {entry.get('reason')}"
    if entry.get("digest") and entry["digest"] != inputs_digest(inputs):
        return None, f"{side.name}: saved outputs were made from other inputs (digest differs)"
    from safetensors.torch import load_file

    t = load_file(str(side.saved / entry["file"]))
    return {"o": t.get("o"), "state": t.get("state"), "intermediate": t.get("intermediate")}, None


def _unavailable(side: Side) -> str | None:
    return side.backend.available() if side.backend is not None else None


def _supports(side: Side, case: Case) -> str | None:
    if side.backend is not None:
        return side.backend.supports(case)
    return None if case.id in side.saved_index["cases"] else "not in the saved outputs"


def explain(a: Side, b: Side, cases: list[Case], *, device: str = "cpu", progress=None) -> Explanation:
    """Compare A and B on ``cases`` and attribute their difference (module docstring)."""
    t0 = time.perf_counter()
    ctxs: list[Ctx] = []
    skipped: list[Skipped] = []
    pols_a, pols_b = [], []
    for case in cases:
        label = case.name or case.id
        why = _supports(a, case) or _supports(b, case)
        if why:
            skipped.append(Skipped(case_id=case.id, label=label, reason=why))
            continue
        inputs = materialize(case, device)
        outs = []
        for side in (a, b):
            o, why = _run_side(side, inputs)
            if o is None:
                break
            outs.append(o)
        if len(outs) < 2:
            skipped.append(Skipped(case_id=case.id, label=label, reason=why))
            continue
        cpu_inputs = inputs.clone("cpu")
        pa, pb = (a.policy(case), a.zero_length_policy), (b.policy(case), b.zero_length_policy)
        ctx = _context(case, cpu_inputs, *pa, *pb)
        ctx.a = _select(outs[0]["o"], outs[0]["state"], outs[0]["intermediate"], ctx)
        ctx.b = _select(outs[1]["o"], outs[1]["state"], outs[1]["intermediate"], ctx)
        ctxs.append(ctx)
        pols_a.append(pa)
        pols_b.append(pb)
        if progress:
            progress(case)
    ex = Explanation(a=a.name, b=b.name, a_version=a.version, b_version=b.version, device=device,
                     verdict="nothing compared", summary="", skipped=skipped)
    if not ctxs:
        ex.summary = "nothing to compare: no case runs on both backends"
        ex.seconds = time.perf_counter() - t0
        return ex

    # distances (pooled and per case), before any fitting
    pooled = {c: _Acc() for c in CHANNELS}
    for ctx in ctxs:
        row = CaseRow(case_id=ctx.case.id, label=ctx.case.name or ctx.case.id, op=ctx.case.op,
                      dtype=ctx.case.dtype, state_dtype=ctx.case.state_dtype)
        for c in CHANNELS:
            if c in ctx.a and c in ctx.b:
                acc = _Acc()
                acc.add(ctx.a[c], ctx.b[c], ctx.ref[c], ctx.dtypes[c])
                row.channels[c] = acc.stats()
        ex.cases.append(row)
    ex.where = _where(ctxs)
    differs = any(not bool(bits_equal(ctx.a[c], ctx.b[c].to(ctx.a[c].dtype)).all())
                  for ctx in ctxs for c in CHANNELS if c in ctx.a and c in ctx.b)

    fitter = Fitter(ctxs, device)
    ca, sa, na, wa = fit(fitter, "a", pols_a, a.family_twin)
    cb, sb, nb, wb = fit(fitter, "b", pols_b, b.family_twin)
    ca, cb, dropped = _simplify(fitter, ca, cb, pols_a, pols_b)
    sa, sb = _score(fitter, ca, "a", pols_a), _score(fitter, cb, "b", pols_b)
    ex.fit_a = Fit(knobs=ca, start=wa, score=sa, evaluations=na, **dict(zip(
        ("identical", "within_1ulp", "residual_floors"), _fit_quality(fitter, ca, "a", pols_a))))
    ex.fit_b = Fit(knobs=cb, start=wb, score=sb, evaluations=nb, **dict(zip(
        ("identical", "within_1ulp", "residual_floors"), _fit_quality(fitter, cb, "b", pols_b))))
    ex.not_observable = dropped
    ex.switches = [{"knob": k, "a": ca[k], "b": cb[k], "phrase": _phrase(k, ca[k], cb[k]),
                    "share_alone": _share_alone(fitter, ctxs, ca, cb, k, pols_a, pols_b)}
                   for k in KNOB_GRID if ca[k] != cb[k]]
    for i, ctx in enumerate(ctxs):
        ta, tb = fitter.twin_out(ca, i, pols_a[i]), fitter.twin_out(cb, i, pols_b[i])
        for c in CHANNELS:
            if c in ctx.a and c in ctx.b and c in ta and c in tb:
                pooled[c].add(ctx.a[c], ctx.b[c], ctx.ref[c], ctx.dtypes[c], ta[c], tb[c])
    ex.channels = {c: acc.stats() for c, acc in pooled.items() if acc.n}
    ex.search = (f"coordinate-wise steepest descent over {len(KNOB_GRID)} knobs "
                 f"({sum(len(v) - 1 for v in KNOB_GRID.values())} moves a round) from the family default, "
                 f"then from the other family; {fitter.runs} twin runs")
    _verdict(ex, differs)
    ex.seconds = time.perf_counter() - t0
    return ex


def _share_alone(fitter: Fitter, ctxs: list[Ctx], ca: dict, cb: dict, k: str, pols_a, pols_b) -> float | None:
    """Share of the output gap (state when no output differs) that switch ``k`` alone
    reproduces: A's twin against A's twin with B's value of ``k`` (B's padding policy)."""
    tb_cfg = {**ca, k: cb[k]}
    for ch in CHANNELS:
        ab = res = 0.0
        for i, ctx in enumerate(ctxs):
            if ch not in ctx.a or ch not in ctx.b:
                continue
            ta, tb = fitter.twin_out(ca, i, pols_a[i]).get(ch), fitter.twin_out(tb_cfg, i, pols_b[i]).get(ch)
            if ta is None or tb is None:
                continue
            d = ctx.a[ch].to(F64) - ctx.b[ch].to(F64)
            ab += float((d ** 2).sum())
            res += float(((d - (ta.to(F64) - tb.to(F64))) ** 2).sum())
        if ab > 0:
            return 1.0 - res / ab
    return None


def _phrase(k: str, va, vb) -> str:
    """'B rounds beta to bfloat16 and A does not' style text."""
    default = KNOB_GRID[k][0]

    def does(v):
        return KNOB_TEXT[k].format(v=v)
    if va == default:
        return f"B {does(vb)} and A does not"
    if vb == default:
        return f"A {does(va)} and B does not"
    return f"A {does(va)}, B {does(vb)}"


def _verdict(ex: Explanation, differs: bool) -> None:
    if not differs:
        ex.verdict = "no difference"
        ex.summary = f"no difference: {ex.a} and {ex.b} are bit-identical on every compared element"
        return
    gap = {c: s for c, s in ex.channels.items() if s.share is not None}
    head = "o" if "o" in gap else next(iter(gap), None)
    ex.headline = head
    ex.share = gap[head].share if head else None
    worst = min((s.share for s in gap.values()), default=0.0)
    resid = math.sqrt(max(0.0, 1.0 - worst))  # r of the module docstring
    names = ", ".join(CHANNEL_NAMES[c] + f" {max(0.0, s.share):.0%}" for c, s in gap.items())
    if not ex.switches:
        ex.verdict = "not explained"
        ex.summary = (f"not explained by rounding: the best twins of {ex.a} and {ex.b} are the same "
                      "configuration; the difference is in the algorithm, the order of operations, "
                      "the layout, or a bug")
        return
    what = "; ".join(s["phrase"] + ("" if len(ex.switches) == 1 or s["share_alone"] is None
                                    else f" ({max(0.0, s['share_alone']):.0%} alone)") for s in ex.switches)
    if resid <= EXPLAINED_MAX_RESIDUAL:
        ex.verdict = "explained"
        ex.summary = f"{what}: explains {max(0.0, ex.share):.0%} of the A-B gap ({names})"
    elif resid <= NOT_EXPLAINED_MIN_RESIDUAL:
        ex.verdict = "partly explained"
        ex.summary = (f"{what}: explains part of the A-B gap ({names}); the rest is in the algorithm, "
                      "the order of operations, the layout, or a bug")
    else:
        ex.verdict = "not explained"
        ex.summary = (f"not explained by rounding: the closest twins differ in ({what}) but reproduce "
                      f"little of the gap ({names}); the difference is in the algorithm, the layout, or a bug")


CHANNEL_NAMES = {"o": "output", "state": "state", "intermediate": "intermediate"}


# ============================================================================ saved outputs

def save_outputs(side: Side, cases: list[Case], directory: Path, *, device: str = "cpu") -> dict:
    """Run a live backend on ``cases`` and keep only what explain needs: per case one safetensors
    file of ``o`` (case dtype), ``state`` (pool or final states) and ``intermediate``; inputs are
    rebuilt from the case on load and checked by digest. Returns the index written to ``index.json``."""
    from safetensors.torch import save_file

    from gdncheck.execute import environment

    directory.mkdir(parents=True, exist_ok=True)
    b = side.backend
    idx = {"backend": side.name, "version": side.version, "twin": side.family_twin,
           "zero_length_policy": side.zero_length_policy, "device": device,
           "environment": environment().model_dump(), "cases": {}}
    for case in cases:
        entry = {"case": json.loads(case.model_dump_json()), "policy": None, "status": "ok"}
        why = b.supports(case)
        if why:
            entry.update(status="unsupported", reason=why)
        else:
            inputs = materialize(case, device)
            entry["digest"] = inputs_digest(inputs)
            entry["policy"] = b.policy(case)
            out, why = _run_side(side, inputs)
            if out is None:
                entry.update(status="error", reason=why)
            else:
                t = {k: v.detach().cpu().contiguous() for k, v in out.items() if v is not None}
                entry["file"] = f"{case.id}.safetensors"
                save_file(t, str(directory / entry["file"]))
        idx["cases"][case.id] = entry
    (directory / "index.json").write_text(json.dumps(idx, indent=1))
    return idx


def saved_cases(side: Side) -> list[Case]:
    return [Case.model_validate(e["case"]) for e in side.saved_index["cases"].values()]
