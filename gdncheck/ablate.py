"""Ablations: the measured effect of one rounding choice, in a paired design.

A :class:`Switch` has two arms, A (the baseline) and B (the change). Each arm is expressed once,
in one of three ways, and applied the same way to every backend that can take it:

- a **case change** (``state_dtype``, ``gate_source``, ``l2norm``): both arms materialise the
  same seed, so q/k/v and the gates are bit-identical;
- an **input transform** done where a serving engine would do it, before the call (beta
  rounded to bf16; q/k normalised and rounded to the input dtype; ``alpha = exp(g)`` in bf16
  for a kernel that takes linear-space alpha computed by its adapter);
- a **rounding inside the kernel**: a precision twin's knob (``beta_dtype``, ``exp_dtype``,
  ``fast_math``) or, for FLA on CUDA, ``FLA_USE_FAST_OPS=1`` in a separate process (FLA reads
  it at import time).

A backend that cannot express an arm for a case is reported as "not expressible" with the
reason; nothing is emulated around a kernel that does the rounding itself.

Each (case, seed) *unit* runs both arms on the same inputs (checked with
:func:`~gdncheck.cases.inputs_digest`; a state-dtype switch compares the state at its lower
precision). Both arms are measured against the same exact reference: the float64 oracle with
gates computed in float64 from the raw inputs, q/k normalised in float64 and arm A's state.

Effects, per unit: the relative change of each error, ``rel_l2(B) / rel_l2(A) - 1`` (output,
state, intermediate states), and the change of the argmax-flip rate of a fixed random 32k-wide
logit projection of the output (:func:`gdncheck.drift.logit_flip_rate`). Per (switch, backend,
op, dtype) group they are averaged over units; the 95% interval is a percentile bootstrap
that resamples cases, then seeds within each case (2000 resamples).
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch

from gdncheck.backends import Backend, load_backend
from gdncheck.data.case import Case
from gdncheck.inputs import DTYPES, Inputs, inputs_digest, materialize
from gdncheck.drift import logit_argmax

_SHORT = {"bf16": "bfloat16", "fp16": "float16", "bfloat16": "bfloat16", "float16": "float16"}
METRICS = ("o", "state", "intermediate")
METRIC_NAMES = {"o": "output error", "state": "state error", "intermediate": "intermediate-state error"}


# ============================================================================ switches

@dataclass(frozen=True)
class Switch:
    """A rounding choice with two arms. ``arm`` is 0 (A, baseline) or 1 (B, the change).

    Attributes:
        name: CLI name (``beta-quant``). title: what arm B does, for verdicts.
        arms: labels of arm A and arm B.
        case_update: per arm, Case fields set on every unit (a case-level switch).
        env: per arm, environment variables the backend process needs (read at import).
        option: the switch's parameter (the dtype of ``beta-quant``).
    """

    name: str
    title: str
    arms: tuple[str, str]
    case_update: tuple[dict, dict] = ({}, {})
    env: tuple[dict, dict] = ({}, {})
    option: str | None = None

    # ---------------------------------------------------------------- cases

    def unit_case(self, case: Case, seed: int) -> Case:
        """The arm-A case of one unit: ``case`` with ``seed`` and arm A's case fields."""
        return case.model_copy(update={"seed": seed, **self.case_update[0]})

    def arm_case(self, unit: Case, arm: int) -> Case:
        return unit.model_copy(update=dict(self.case_update[arm]))

    def reference_case(self, unit: Case) -> Case:
        """The reference of both arms: the oracle of arm A's own case, exactly as ``gdncheck run``
        builds it for that case (its gates, its L2 norm setting, its state), so arm A's metrics
        equal ``run``'s on the same inputs and arm B's differ by the switch alone."""
        return self.arm_case(unit, 0)

    # ---------------------------------------------------------------- expressibility

    def supports(self, backend: Backend, unit: Case) -> str | None:
        """None when ``backend`` runs both arms' cases of ``unit``, else why not (one line)."""
        for arm in (0, 1):
            why = backend.supports(self.arm_case(unit, arm))
            if why:
                return why if arm == 0 else f"arm {self.arms[arm]}: {why}"
        return None

    def express(self, backend: Backend, unit: Case) -> str | None:
        """None when ``backend`` can express arm B on ``unit``, else why not (one line)."""
        return self._express(backend, unit)

    def _express(self, backend: Backend, unit: Case) -> str | None:
        return None

    def mechanism(self, backend: Backend, unit: Case) -> str:
        return "case fields " + ", ".join(f"{k}={v[0]!r}->{v[1]!r}" for k, v in self._case_diff().items())

    def _case_diff(self) -> dict:
        a, b = self.case_update
        return {k: (a.get(k), b[k]) for k in b if a.get(k) != b[k]}

    # ---------------------------------------------------------------- arms

    def backend_for(self, backend: Backend, unit: Case, arm: int) -> Backend:
        """The backend instance of an arm: a precision twin may get a knob (a rounding inside the
        kernel); any other backend runs as loaded."""
        return backend

    def transform(self, inputs: Inputs, backend: Backend, arm: int) -> tuple[Inputs, list[str]]:
        """Arm's work on the inputs before the call; returns the inputs and what was done."""
        return inputs, []

    def pairing_view(self, inputs: Inputs) -> Inputs:
        """What must be bit-identical between the arms' materialised inputs."""
        return inputs


def _is_twin(backend: Backend) -> bool:
    """A backend whose rounding points are constructor knobs (it declares every switch)."""
    return set(SWITCH_NAMES) <= backend.ablation_knobs


def _has_knob(backend: Backend, knob: str) -> bool:
    return _is_twin(backend)


def _takes_linear_alpha(backend: Backend) -> bool:
    """The adapter computes ``alpha = exp(g)`` in PyTorch and the kernel takes linear alpha: it
    declares the exp-precision switch without being a twin."""
    return "exp-precision" in backend.ablation_knobs and not _is_twin(backend)


class BetaQuant(Switch):
    """Round beta to bf16 (or fp16) before the recurrence uses it, vs fp32 beta.

    Precomputed gates: arm B rounds ``inputs.beta`` (what SGLang's extend path does).
    Raw gates: the kernel computes beta itself; only a twin (``beta_dtype`` knob) can express it.
    """

    def _express(self, backend, unit):
        if unit.gate_source == "precomputed":
            return None
        if _is_twin(backend) and _has_knob(backend, "beta_dtype"):
            return None
        return (f"{backend.name} computes beta = sigmoid(b) inside the kernel in fp32 (raw gates); "
                "rounding it is a kernel change")

    def mechanism(self, backend, unit):
        if unit.gate_source == "precomputed":
            return f"inputs.beta rounded to {self.option} before the call"
        return f"twin knob beta_dtype={self.option}"

    def transform(self, inputs, backend, arm):
        if arm == 0:
            return inputs, []
        if inputs.case.gate_source == "precomputed":
            inputs.beta = inputs.beta.to(DTYPES[self.option]).to(torch.float32)
            return inputs, [f"beta rounded to {self.option}"]
        return inputs, []

    def backend_for(self, backend: Backend, unit: Case, arm: int) -> Backend:
        if arm == 1 and unit.gate_source == "raw" and _is_twin(backend):
            return type(backend)(beta_dtype=self.option)
        return backend


class ExpPrecision(Switch):
    """Evaluate ``alpha = exp(g)`` in bf16 (g rounded to bf16, result rounded to bf16) vs fp32.

    Twins: the ``exp_dtype`` knob. A kernel that takes linear-space alpha computed by its adapter
    (FlashInfer prefill, ``alpha = exp(g.float())`` as SGLang does): arm B hands the adapter
    ``g := log(bf16(exp(bf16(g))))``, so its fp32 exp returns the bf16 alpha (to 1 fp32 ulp).
    Kernels that take log-space g or raw gates evaluate exp inside in fp32: not expressible.
    """

    def _express(self, backend, unit):
        if _is_twin(backend):
            return None if _has_knob(backend, "exp_dtype") else f"{backend.name} has no exp_dtype knob"
        if _takes_linear_alpha(backend) and unit.gate_source == "precomputed":
            return None
        if unit.gate_source == "raw":
            return f"{backend.name} computes g and exp(g) inside the kernel in fp32 (raw gates)"
        return f"{backend.name} takes log-space g and evaluates exp inside the kernel in fp32"

    def mechanism(self, backend, unit):
        if _is_twin(backend):
            return "twin knob exp_dtype=bfloat16"
        return "adapter's alpha = exp(g) evaluated in bf16 (g := log(bf16(exp(bf16(g)))))"

    def backend_for(self, backend, unit, arm):
        if _is_twin(backend):
            return type(backend)(exp_dtype="bfloat16" if arm else "float32")
        return backend

    def transform(self, inputs, backend, arm):
        if arm == 0 or _is_twin(backend):
            return inputs, []
        alpha = torch.exp(inputs.g.to(torch.bfloat16)).to(torch.float32)
        inputs.g = torch.log(alpha)
        return inputs, ["alpha = exp(g) in bf16 (passed as g = log(alpha_bf16))"]


class L2NormSwitch(Switch):
    """q/k L2 norm inside the kernel vs precomputed by the adapter in fp32 and rounded to the input dtype."""

    def mechanism(self, backend, unit):
        return "case.l2norm=False with q, k normalised in fp32 and rounded to the input dtype before the call"

    def transform(self, inputs, backend, arm):
        if arm == 0:
            return inputs, []
        dt = inputs.q.dtype
        norm = lambda x: (x.float() * torch.rsqrt((x.float() ** 2).sum(-1, keepdim=True) + 1e-6)).to(dt)  # noqa: E731
        inputs.q, inputs.k = norm(inputs.q), norm(inputs.k)
        return inputs, ["q, k L2-normalised in fp32 by the adapter, rounded to the input dtype"]


class StateDtype(Switch):
    """fp32 vs bf16 state: the same seed, the initial state rounded to bf16 in arm B."""

    def pairing_view(self, inputs):
        return dataclasses.replace(inputs, state=inputs.state.to(torch.bfloat16))


class FastMath(Switch):
    """Fast exp/log: FLA's ``FLA_USE_FAST_OPS=1`` (``__expf``/``__logf``) vs precise; twins' ``fast_math`` knob."""

    def _express(self, backend, unit):
        if "fast-math" in backend.ablation_knobs:
            return None
        note = backend.ablation_notes.get("fast-math")
        return f"{backend.name}: {note}" if note else f"{backend.name} has no fast-math switch"

    def mechanism(self, backend, unit):
        return "twin knob fast_math=True" if _is_twin(backend) else "FLA_USE_FAST_OPS=1 in a fresh process"

    def backend_for(self, backend, unit, arm):
        if _is_twin(backend):
            return type(backend)(fast_math=bool(arm))
        return backend

    def needs_process(self, backend: Backend, arm: int) -> bool:
        return arm == 1 and not _is_twin(backend)


def make_switch(name: str, option: str | None = None) -> Switch:
    """A switch by CLI name; ``option`` is beta-quant's dtype (bf16 | fp16)."""
    if name == "beta-quant":
        dt = _SHORT.get(option or "bf16")
        if dt is None:
            raise ValueError(f"beta-quant: dtype bf16 or fp16, got {option!r}")
        short = "bf16" if dt == "bfloat16" else "fp16"
        return BetaQuant(name, f"rounding beta to {short}", ("beta fp32", f"beta {short}"), option=dt)
    if name == "exp-precision":
        return ExpPrecision(name, "evaluating exp(g) in bf16", ("exp fp32", "exp bf16"))
    if name == "state-dtype":
        return StateDtype(name, "a bf16 state", ("state fp32", "state bf16"),
                          case_update=({"state_dtype": "float32"}, {"state_dtype": "bfloat16"}))
    if name == "gate-source":
        return Switch(name, "gating inside the kernel from raw inputs", ("precomputed g, beta", "raw gates"),
                      case_update=({"gate_source": "precomputed"}, {"gate_source": "raw"}))
    if name == "l2norm":
        return L2NormSwitch(name, "precomputing the q/k L2 norm (rounded to the input dtype)",
                            ("l2norm in kernel", "l2norm precomputed"),
                            case_update=({"l2norm": True}, {"l2norm": False}))
    if name == "fast-math":
        return FastMath(name, "fast exp/log", ("precise exp/log", "fast exp/log"),
                        env=({}, {"FLA_USE_FAST_OPS": "1"}))
    raise ValueError(f"unknown switch {name!r}; known: {', '.join(SWITCH_NAMES)}")


SWITCH_NAMES = ("beta-quant", "exp-precision", "state-dtype", "gate-source", "l2norm", "fast-math")


# ============================================================================ one arm



def _live_tokens(inputs: Inputs, o_class: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: tokens of live (non-padded) sequences the oracle defines."""
    from gdncheck.metrics import token_rows
    from gdncheck_reference import OUT_ORACLE

    live = (o_class == OUT_ORACLE).clone()
    for n in inputs.case.padded_rows:
        b, sl = token_rows(inputs)[n]
        live[b, sl] = False
    return live


@dataclass
class _Ref:
    exp: object
    tokens: torch.Tensor  # [B, T] bool


class ArmRunner:
    """Runs arms of units on one backend spec in this process, caching the reference per unit."""

    def __init__(self, switch: Switch, spec: str, device: str, vocab: int = 32768):
        self.switch, self.spec, self.vocab = switch, spec, vocab
        self.base = load_backend(spec)
        # CPU-only backends (the interpreter) run on the CPU whatever the run's device
        self.device = torch.device("cpu" if getattr(self.base.caps, "device", "") == "cpu" else device)
        self._refs: dict[tuple, _Ref] = {}

    def backend(self, unit: Case, arm: int) -> Backend:
        return self.switch.backend_for(self.base, unit, arm)

    def _reference(self, unit: Case, policy: str, zero_length: str) -> _Ref:
        from gdncheck.oracle import expected

        key = (unit.id, policy, zero_length)
        if key not in self._refs:
            ref_in = materialize(self.switch.reference_case(unit), self.device)
            exp = expected(ref_in, policy, zero_length, device=self.device)
            tokens = _live_tokens(ref_in, exp.o_class.to(self.device))
            while len(self._refs) >= 2:  # both arms of one unit (their policies may differ)
                self._refs.pop(next(iter(self._refs)))
            self._refs[key] = _Ref(exp, tokens)
        return self._refs[key]

    def forget_references(self) -> None:
        """Drop cached references: one serves the two arms of a unit, the next task has others."""
        self._refs.clear()

    def run(self, unit: Case, arm: int, origin: str | None = None, defer_flips: bool = False) -> dict:
        """One arm of one unit -> a JSON-able record (status, digest, errors, flips).

        ``origin``: id of the suite case the unit came from (units of one origin differ by seed).
        ``defer_flips``: leave the output rows in ``_o`` for :meth:`flips` (both arms of a unit
        share the reference and one pass over the projection).
        """
        from gdncheck import metrics

        s = self.switch
        rec = {"unit": unit.id, "base": origin or unit.model_copy(update={"seed": 0}).id, "case": unit.name or unit.id,
               "seed": unit.seed, "arm": arm,
               "op": unit.op, "dtype": unit.dtype, "backend": self.base.name}
        why = self.base.available()
        if why:
            return {**rec, "status": "unavailable", "reason": why}
        why = s.supports(self.base, unit)
        if why:
            return {**rec, "status": "unsupported", "reason": why}
        why = s.express(self.base, unit)
        if why:
            return {**rec, "status": "not_expressible", "reason": why}
        case = s.arm_case(unit, arm)
        rec["case_id"] = case.id
        try:
            be = self.backend(unit, arm)
            inputs = materialize(case, self.device)
            rec["digest"] = inputs_digest(s.pairing_view(inputs))
            inputs, work = s.transform(inputs, be, arm)
            before = inputs.clone()
            out = be.run(inputs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - a kernel error is a result
            return {**rec, "status": "error", "reason": f"{type(e).__name__}: {e}"[:500]}
        policy = be.policy(case)
        ref = self._reference(unit, policy, be.zero_length_policy)
        m, con = metrics.evaluate(before, out, ref.exp)
        rec.update(status="ok", path=out.path, adapter_work=list(out.adapter_work) + work, policy=policy,
                   mechanism=s.mechanism(self.base, unit))
        for k in METRICS:
            if k in m and m[k].rel_l2 is not None:
                rec[k] = m[k].rel_l2
                rec[k + "_floors"] = m[k].in_floors
        if con.nan_where_finite:  # errors over the finite part would flatter this arm
            return {**rec, "status": "nan", "reason": f"{con.nan_where_finite} NaN/Inf where the oracle is finite"}
        o = out.o.to(self.device)[ref.tokens]
        rec["tokens"] = int(o.shape[0])
        rec["_o"], rec["_ref"] = o, ref  # flips() takes both arms through the projection at once
        if not defer_flips:
            self.flips([rec])
        return rec

    def flips(self, recs: list[dict]) -> None:
        """Set ``flips`` on records of one unit (holding ``_o``, ``_ref``): one projection pass per reference."""
        todo = [r for r in recs if "_o" in r]
        while todo:
            ref = todo[0]["_ref"]
            mine = [r for r in todo if r["_ref"] is ref]
            todo = [r for r in todo if r["_ref"] is not ref]
            xs = [ref.exp.o.to(self.device)[ref.tokens]] + [r["_o"] for r in mine]
            n = xs[0].shape[0]
            if n:
                am = logit_argmax(torch.cat([x.to(torch.float32) for x in xs]), self.vocab)
                for i, r in enumerate(mine, 1):
                    r["flips"] = float((am[i * n:(i + 1) * n] != am[:n]).double().mean().item())
        for r in recs:
            r.pop("_o", None)
            r.pop("_ref", None)


def _run_arm_batch(switch_name: str, option: str | None, spec: str, device: str, vocab: int,
                   units_json: list[tuple[str, str]], arm: int, env: dict) -> list[dict]:  # noqa: D401
    """Worker entry: one arm of many ``(unit json, origin)``, in a process whose environment is ``env``."""
    os.environ.update(env)
    sw = make_switch(switch_name, option)
    r = ArmRunner(sw, spec, device, vocab)
    return [r.run(Case.model_validate_json(u), arm, o) for u, o in units_json]


# ============================================================================ statistics

def bootstrap(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict | None:
    """Mean of per-case means and its percentile interval, resampling cases then seeds within a case.

    Args:
        values: ``[C, S]`` float, NaN where a (case, seed) unit has no value.
    Returns:
        ``{"mean", "lo", "hi", "n_cases", "n_units"}`` or None when no value is finite.
    """
    v = np.asarray(values, dtype=float)
    if v.ndim == 1:
        v = v[:, None]
    v = v[np.isfinite(v).any(axis=1)]
    if v.size == 0:
        return None
    v = np.sort(np.where(np.isfinite(v), v, np.nan), axis=1)  # NaN last: valid values first
    nvalid = np.isfinite(v).sum(axis=1)
    C, S = v.shape
    point = float(np.mean([row[:k].mean() for row, k in zip(v, nvalid)]))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, C, size=(n_boot, C))
    cols = (rng.random((n_boot, C, S)) * nvalid[rows][..., None]).astype(int)
    draws = v[rows[..., None], cols]  # [R, C, S]; only valid columns drawn
    stats = draws.mean(axis=2).mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return {"mean": point, "lo": float(lo), "hi": float(hi), "n_cases": int(C), "n_units": int(nvalid.sum())}


def _matrix(pairs: dict[str, dict[int, float]]) -> np.ndarray:
    """``{case: {seed: value}}`` -> ``[C, S]`` with NaN holes."""
    seeds = sorted({s for d in pairs.values() for s in d})
    col = {s: i for i, s in enumerate(seeds)}
    m = np.full((len(pairs), max(len(seeds), 1)), np.nan)
    for i, d in enumerate(pairs.values()):
        for s, x in d.items():
            m[i, col[s]] = x
    return m


def _rel_effect(a: float | None, b: float | None) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return float("nan")
    if a == 0:
        return 0.0 if b == 0 else float("nan")
    return b / a - 1.0


def summarize(records: list[dict], switch: Switch, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Per (backend, op, dtype): effects with intervals, arm means, verdict. ``records`` from :class:`ArmRunner`."""
    by_unit: dict[tuple, dict[int, dict]] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        by_unit.setdefault((r["backend"], r["unit"]), {})[r["arm"]] = r
    groups: dict[tuple, dict] = {}
    for (backend, _), arms in by_unit.items():
        if 0 not in arms or 1 not in arms:
            continue
        a, b = arms[0], arms[1]
        if a.get("digest") != b.get("digest"):
            raise RuntimeError(f"{switch.name} {backend} unit {a['unit']}: arms got different inputs "
                               f"({a.get('digest')} vs {b.get('digest')})")
        g = groups.setdefault((backend, a["op"], a["dtype"]), {"units": [], "mechanisms": set()})
        g["units"].append((a, b))
        g["mechanisms"].add(a.get("mechanism", ""))
    out = []
    for (backend, op, dtype), g in sorted(groups.items()):
        res = {"switch": switch.name, "title": switch.title, "arms": list(switch.arms), "backend": backend,
               "op": op, "dtype": dtype, "units": len(g["units"]), "mechanism": sorted(g["mechanisms"]),
               "pairing": "verified: arm inputs identical by digest in every unit",
               "effects": {}, "arm_means": {}}
        per_case_seed = lambda f: _matrix(_collect(g["units"], f))  # noqa: E731
        for k in METRICS:
            if not any(k in a and k in b for a, b in g["units"]):
                continue
            e = bootstrap(per_case_seed(lambda a, b, k=k: _rel_effect(a.get(k), b.get(k))), n_boot, seed)
            if e is not None:
                res["effects"][k] = e
            for arm, idx in (("A", 0), ("B", 1)):
                vals = [u[idx].get(k + "_floors") for u in g["units"] if u[idx].get(k + "_floors") is not None]
                errs = [u[idx].get(k) for u in g["units"] if u[idx].get(k) is not None]
                res["arm_means"].setdefault(k, {})[arm] = {
                    "rel_l2": float(np.mean(errs)) if errs else None,
                    "in_floors": float(np.mean(vals)) if vals else None}
        fl = bootstrap(per_case_seed(lambda a, b: (b["flips"] - a["flips"]) if "flips" in a and "flips" in b
                                     else float("nan")), n_boot, seed)
        if fl is not None:
            res["effects"]["flips"] = fl
            res["arm_means"]["flips"] = {"A": float(np.mean([u[0].get("flips", np.nan) for u in g["units"]])),
                                         "B": float(np.mean([u[1].get("flips", np.nan) for u in g["units"]]))}
            res["tokens"] = int(sum(u[0].get("tokens", 0) for u in g["units"]))
        res["verdict"] = verdict(res, switch)
        out.append(res)
    return out


def _collect(units, f) -> dict[str, dict[int, float]]:
    """``{case key (seed-free): {seed: f(a, b)}}``."""
    d: dict[str, dict[int, float]] = {}
    for a, b in units:
        d.setdefault(a["base"], {})[a["seed"]] = f(a, b)
    return d


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:+.{digits}f}%"


def _ratio_text(x: float) -> str:
    r = 1.0 + x
    if r >= 1000:  # three significant digits without an exponent
        return f"×{round(r, 2 - int(math.floor(math.log10(r)))):.0f}"
    return f"×{r:.3g}"


def fmt_effect(e: dict | None, flips: bool = False) -> str:
    """``+4.3% [+3.4%, +5.5%]``; ``×3350 [×1150, ×7470]`` once an error more than doubles;
    flips in percentage points."""
    if e is None:
        return "-"
    m, lo, hi = e["mean"], e["lo"], e["hi"]
    if flips:
        return f"{100 * m:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] pp"
    if max(abs(m), abs(lo), abs(hi)) >= 1.0:
        return f"{_ratio_text(m)} [{_ratio_text(lo)}, {_ratio_text(hi)}]"
    return f"{_pct(m)} [{_pct(lo)}, {_pct(hi)}]"


def _effect_text(e: dict, what: str, means: dict | None = None, flips: bool = False, tokens: int = 0) -> str:
    mean, lo, hi = e["mean"], e["lo"], e["hi"]
    none = lo <= 0 <= hi
    if flips:
        ctx = ""
        if means:
            ctx = f" ({100 * means['A']:.2f}% -> {100 * means['B']:.2f}% of {tokens} tokens)"
        if none:
            return (f"no detectable change in the argmax-flip rate ({100 * mean:+.2f} pp, 95% CI "
                    f"{100 * lo:+.2f} to {100 * hi:+.2f}){ctx}")
        return (f"{'flips' if mean > 0 else 'un-flips'} {100 * abs(mean):.2f}% ± {100 * (hi - lo) / 2:.2f}% "
                f"more argmaxes (95% CI {100 * lo:+.2f} to {100 * hi:+.2f} pp){ctx}")
    ctx = ""
    if means and means["A"].get("in_floors") is not None and means["B"].get("in_floors") is not None:
        ctx = f", {means['A']['in_floors']:.3g} -> {means['B']['in_floors']:.3g} floors"
    if none:
        return f"no detectable change in {what} ({_pct(mean)}, 95% CI {_pct(lo)} to {_pct(hi)}{ctx})"
    if max(abs(mean), abs(lo), abs(hi)) >= 1.0:
        return (f"multiplies {what} by {_ratio_text(mean)} "
                f"(95% CI {_ratio_text(lo)} to {_ratio_text(hi)}{ctx})")
    return (f"{'raises' if mean > 0 else 'lowers'} {what} by {100 * abs(mean):.1f}% ± {100 * (hi - lo) / 2:.1f}% "
            f"(95% CI {_pct(lo)} to {_pct(hi)}{ctx})")


def verdict(res: dict, switch: Switch) -> str:
    """One plain sentence for a group's effects."""
    parts = []
    for k in METRICS:
        if k in res["effects"]:
            parts.append(_effect_text(res["effects"][k], METRIC_NAMES[k], res["arm_means"].get(k)))
    if "flips" in res["effects"]:
        parts.append(_effect_text(res["effects"]["flips"], "", res["arm_means"].get("flips"), flips=True,
                                  tokens=res.get("tokens", 0)))
    e0 = next(iter(res["effects"].values()), None)
    nc = e0["n_cases"] if e0 else None
    n = (f"{nc} case{'s' if nc != 1 else ''}, " if nc else "") + f"{res['units']} units"
    body = "; ".join(parts) if parts else "has nothing measurable"
    return (f"{switch.title[0].upper() + switch.title[1:]} ({switch.arms[1]} vs {switch.arms[0]}) on "
            f"{res['op']} {res['dtype']}, {res['backend']} ({n}): {body}.")


# ============================================================================ the run

@dataclass
class AblationResult:
    """Everything ``gdncheck ablate`` measured."""

    switches: list[str]
    backends: list[str]
    device: str
    suites: list[str]
    seeds: int
    groups: list[dict] = field(default_factory=list)  # summarize() rows, all switches
    skipped: list[dict] = field(default_factory=list)  # {switch, backend, status, reason, units}
    records: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    jobs: int = 1  # worker processes

    def to_json(self) -> dict:
        from gdncheck.execute import environment
        env = environment().model_dump()
        return {"kind": "ablation", "schema_version": 1, "switches": self.switches, "backends": self.backends,
                "device": self.device, "suites": self.suites, "seeds_per_case": self.seeds,
                "jobs": self.jobs, "wall_s": round(self.wall_s, 2), "environment": env, "groups": self.groups,
                "skipped": self.skipped, "records": self.records}


def unit_seeds(case: Case, n: int) -> list[int]:
    """Seeds of a case's units: its own seed, then ``seed + 1000 i``."""
    return [case.seed + 1000 * i for i in range(n)]


def units_for(switch: Switch, cases: list[Case], seeds: int) -> list[tuple[Case, str]]:
    """``(arm-A unit case, origin case id)``, deduplicated (a case-level switch maps case
    variants onto one unit)."""
    out, seen = [], set()
    for c in cases:
        for s in unit_seeds(c, seeds):
            u = switch.unit_case(c, s)
            if u.id not in seen:
                seen.add(u.id)
                out.append((u, switch.unit_case(c, c.seed).id))
    return out


def ablate(switches: list[Switch], cases: list[Case], backend_specs: list[str], *, device: str = "cpu",
           seeds: int = 3, vocab: int = 32768, n_boot: int = 2000, suites: list[str] | None = None,
           progress: bool = False, after=None, jobs: int = 1) -> AblationResult:
    """Run every switch on every backend over ``cases`` x ``seeds``; both arms per unit.

    ``after(result, switch, spec)`` is called after each (switch, backend) with the groups of
    finished switches (e.g. to write a partial report). ``jobs > 1`` runs the units through the
    shared executor's lanes (:func:`gdncheck.execute.run_units`: compile-key units, memory
    admission, crash isolation); the result is the same as with one.
    """
    from gdncheck.progress import Progress

    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    t0 = time.perf_counter()
    res = AblationResult([s.name for s in switches], list(backend_specs), device, suites or [], seeds, jobs=jobs)
    units = [units_for(sw, cases, seeds) for sw in switches]
    with Progress("gdncheck ablate", sum(len(u) for u in units) * len(backend_specs), enabled=progress) as bar:
        if jobs > 1:
            return _ablate_parallel(res, t0, switches, units, backend_specs, device, vocab, n_boot, bar, after, jobs)
        for sw, us in zip(switches, units):
            recs: list[dict] = []
            for spec in backend_specs:
                mine = _run_spec(sw, spec, device, vocab, us, lambda *_: bar.advance())
                recs += mine
                _note_skips(res, sw, spec, mine)
                if after:
                    res.wall_s = time.perf_counter() - t0
                    after(res, sw.name, spec)
            res.records += recs
            res.groups += summarize(recs, sw, n_boot=n_boot)
    res.wall_s = time.perf_counter() - t0
    return res


def _run_spec(sw: Switch, spec: str, device: str, vocab: int, units: list[tuple[Case, str]],
              progress=None) -> list[dict]:
    """Records of every unit of one (switch, backend spec), in this process (arm B of a
    :class:`FastMath` switch on a real FLA kernel in a process of its own)."""
    runner = ArmRunner(sw, spec, device, vocab)
    if _needs_own_env(sw, runner.base):
        mine = [runner.run(u, 0, o) for u, o in units]
        todo = [(u, o) for (u, o), r in zip(units, mine) if r.get("status") == "ok"]
        if todo:
            mine += _in_process_with_env(sw, spec, device, vocab, todo, 1, dict(sw.env[1]))
        return mine
    mine = []
    for u, o in units:
        mine += _unit_pair(runner, u, o)
        if progress:
            progress(sw.name, spec, u)
    return mine


def _needs_own_env(sw: Switch, backend: Backend) -> bool:
    return (isinstance(sw, FastMath) and any(sw.needs_process(backend, arm) for arm in (0, 1))
            and backend.available() is None)


def _unit_pair(runner: ArmRunner, u: Case, origin: str) -> list[dict]:
    """Arm A, then arm B when A ran; flips of both in one projection pass."""
    r0 = runner.run(u, 0, origin, defer_flips=True)
    pair = [r0]
    if r0.get("status") == "ok":
        pair.append(runner.run(u, 1, origin, defer_flips=True))
    runner.flips(pair)
    return pair


def _in_process_with_env(sw, spec, device, vocab, units, arm, env) -> list[dict]:
    """Run one arm in a fresh spawned process whose environment has ``env`` before any import."""
    import multiprocessing as mp

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # spawn copies the parent's environment at start
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
            fut = ex.submit(_run_arm_batch, sw.name, sw.option, spec, device, vocab,
                            [(u.model_dump_json(), o) for u, o in units], arm, env)
            try:
                return fut.result()
            except Exception as e:  # noqa: BLE001 - a dead worker is a result for every unit
                return _worker_errors(units, arm, spec, e)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker_errors(units: list[tuple[Case, str]], arm: int, spec: str, e: BaseException) -> list[dict]:
    """One error record per unit whose worker process died or raised."""
    return [{"unit": u.id, "base": o, "case": u.name or u.id, "seed": u.seed, "arm": arm, "op": u.op,
             "dtype": u.dtype, "backend": spec, "status": "error",
             "reason": f"worker: {type(e).__name__}: {e}"[:500]} for u, o in units]


# ---------------------------------------------------------------- parallel: the shared executor

@dataclass
class _Task:
    """Units ``ks`` (indices into ``units_for``) of switch ``i`` on backend spec ``j``.

    ``whole``: all units through :func:`_run_spec` in this process (a FastMath arm that needs a
    fresh process of its own environment).
    """

    i: int
    j: int
    ks: list[int]
    whole: bool = False


_RUNNERS: dict[tuple, ArmRunner] = {}  # per worker process: loaded backends keep their compiled kernels


def task_units(payload: dict) -> list[list[dict]]:
    """Lane task (``Lane.call("gdncheck.ablate:task_units", payload)``): each unit's records
    (``[arm A]`` or ``[arm A, arm B]``), as the one-process path makes them."""
    from gdncheck.execute import release_device_memory

    key = (payload["switch"], payload["option"], payload["spec"], payload["device"], payload["vocab"])
    if key not in _RUNNERS:
        _RUNNERS[key] = ArmRunner(make_switch(payload["switch"], payload["option"]), payload["spec"],
                                  payload["device"], payload["vocab"])
    runner = _RUNNERS[key]
    try:
        return [_unit_pair(runner, Case.model_validate_json(u), o) for u, o in payload["units"]]
    finally:
        runner.forget_references()
        release_device_memory()


def _make_tasks(switches: list[Switch], specs: list[str], units: list[list[tuple[Case, str]]]) -> list[_Task]:
    """Tasks in start order: most units first (compiles dominate, so the longest go first), then (i, j, k).
    A task holds the units of one schedule key of its backend (:meth:`Backend.schedule_key`, on
    the arm-A unit), so kernels compile once per task."""
    tasks = []
    backends = [load_backend(spec) for spec in specs]
    for i, sw in enumerate(switches):
        for j, be in enumerate(backends):
            if not units[i]:
                continue
            if _needs_own_env(sw, be):
                tasks.append(_Task(i, j, list(range(len(units[i]))), whole=True))
                continue
            groups: dict[tuple, list[int]] = {}
            for k, (u, _) in enumerate(units[i]):
                groups.setdefault(be.schedule_key(u), []).append(k)
            tasks += [_Task(i, j, ks) for ks in groups.values()]
    return sorted(tasks, key=lambda t: (-len(t.ks), t.i, t.j, t.ks[0]))


def _ablate_parallel(res: AblationResult, t0: float, switches: list[Switch], units: list[list[tuple[Case, str]]],
                     specs: list[str], device: str, vocab: int, n_boot: int, bar, after, jobs: int) -> AblationResult:
    """:func:`ablate` over ``jobs`` lanes of the shared executor, one task (units of one compile key)
    a job. A lane whose worker dies charges exactly its task (its units become error records).
    Records are reassembled in the one-process order, so summaries and skips are identical."""
    from gdncheck.execute import Job, case_bytes, closing, is_oom, memory_budget, run_units, start_lanes

    tasks = _make_tasks(switches, specs, units)
    per_unit: dict[tuple[int, int], dict[int, list[dict]]] = {}
    whole: dict[tuple[int, int], list[dict]] = {}

    def job(t: _Task) -> Job:
        sw, spec = switches[t.i], specs[t.j]
        mine = [units[t.i][k] for k in t.ks]
        payload = {"switch": sw.name, "option": sw.option, "spec": spec, "device": device, "vocab": vocab,
                   "units": [(u.model_dump_json(), o) for u, o in mine]}

        def oom(reply: dict) -> bool:
            if "error" in reply:
                return is_oom(reply["error"])
            return any(r.get("status") == "error" and is_oom(r.get("reason") or "") for rs in reply["ok"] for r in rs)

        def record(reply: dict) -> None:
            out = reply.get("ok")
            if out is None:
                out = [[r] for r in _worker_errors(mine, 0, spec, RuntimeError(reply["error"]))]
            per_unit.setdefault((t.i, t.j), {}).update(zip(t.ks, out))
            bar.advance(n=len(t.ks))

        return Job(send=lambda lane: lane.call("gdncheck.ablate:task_units", payload), record=record,
                   need=max(case_bytes(u) for u, _ in mine), oom=oom)

    lane_tasks = [t for t in tasks if not t.whole]
    if lane_tasks:
        lanes = start_lanes(device, min(jobs, len(lane_tasks)))
        with closing(lanes):
            run_units([[job(t)] for t in lane_tasks], lanes, memory_budget(device))
    for t in tasks:
        if t.whole:
            whole[t.i, t.j] = _run_spec(switches[t.i], specs[t.j], device, vocab, units[t.i],
                                        lambda *_: bar.advance())
    for i, sw in enumerate(switches):
        recs = []
        for j, spec in enumerate(specs):
            mine = whole.get((i, j))
            if mine is None:
                got = per_unit.get((i, j), {})
                mine = [r for k in range(len(units[i])) for r in got.get(k, [])]
            recs += mine
            _note_skips(res, sw, spec, mine)
        res.records += recs
        res.groups += summarize(recs, sw, n_boot=n_boot)
        if after:
            res.wall_s = time.perf_counter() - t0
            for spec in specs:
                after(res, sw.name, spec)
    res.wall_s = time.perf_counter() - t0
    return res


def _note_skips(res: AblationResult, sw: Switch, spec: str, recs: list[dict]) -> None:
    agg: dict[tuple, int] = {}
    for r in recs:
        if r.get("status") in ("ok", None):
            continue
        agg[(r["status"], r.get("reason", ""))] = agg.get((r["status"], r.get("reason", "")), 0) + 1
    for (status, reason), n in sorted(agg.items(), key=lambda x: -x[1]):
        res.skipped.append({"switch": sw.name, "backend": spec, "status": status, "reason": reason, "units": n})


# ============================================================================ output

def table(res: AblationResult):
    """Rich renderable: one table per switch (rows: backend, op and dtype)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table

    def cell(e, flips=False):
        if e is None:
            return "-"
        head, _, ci = fmt_effect(e, flips).removesuffix(" pp").partition(" [")
        txt = head + "\n[" + ci.replace("%", "")
        if e["lo"] <= 0 <= e["hi"]:
            return f"[dim]{txt}[/dim]"
        return f"[red]{txt}[/red]" if e["mean"] > 0 else f"[green]{txt}[/green]"

    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    tables = []
    for sw in res.switches:
        gs = [g for g in res.groups if g["switch"] == sw]
        if not gs:
            continue
        t = Table(title=f"[bold]{sw}[/bold]: {gs[0]['arms'][1]} vs {gs[0]['arms'][0]} "
                        f"({res.device}, {res.seeds} seeds/case)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        t.add_column("backend", no_wrap=True)
        t.add_column("op", max_width=7)
        t.add_column("n", justify="right", no_wrap=True)
        for col in ("Δ output err", "Δ state err", "Δ flips (pp)"):
            t.add_column(col, justify="right", min_width=14)
        for g in gs:
            e = g["effects"]
            n = next(iter(e.values()), {}).get("n_cases", "?")
            t.add_row(g["backend"], f"{g['op']} {short.get(g['dtype'], g['dtype'])}", f"{n}/{g['units']}",
                      cell(e.get("o")), cell(e.get("state")), cell(e.get("flips"), True))
        tables.append(t)
    tables.append("[dim]n = cases/units; mean effect of arm B vs arm A [95% CI]; red: worse, green: better, "
                  "dim: the interval covers 0[/dim]")
    return Group(*tables)


def _fig_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plot_switch(groups: list[dict], switch: str) -> str | None:
    """Base64 PNG: per metric, each (backend, op, dtype) effect with its 95% interval."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = [g for g in groups if g["switch"] == switch and g["effects"]]
    if not gs:
        return None
    keys = [k for k in (*METRICS, "flips") if any(k in g["effects"] for g in gs)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 0.5 + 0.42 * len(gs)), squeeze=False)
    labels = [f"{g['backend']} · {g['op']} · {g['dtype']}" for g in gs]
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax, k in zip(axes[0], keys):
        flips = k == "flips"
        es = [g["effects"].get(k) for g in gs]
        # errors: percent change, or the ratio B/A on a log axis once some error more than doubles
        ratio = not flips and any(e and max(e["hi"], -e["lo"]) >= 1.0 for e in es)
        f = (lambda x: max(1 + x, 1e-3)) if ratio else (lambda x: 100 * x)
        for i, e in enumerate(es):
            if e is None:
                continue
            color = "0.5" if e["lo"] <= 0 <= e["hi"] else ("tab:red" if e["mean"] > 0 else "tab:green")
            m, lo, hi = f(e["mean"]), f(e["lo"]), f(e["hi"])
            ax.errorbar([m], [i], xerr=[[max(m - lo, 0)], [max(hi - m, 0)]], fmt="o", color=color, capsize=3)
        ax.axvline(1 if ratio else 0, color="k", lw=0.8)
        if ratio:
            ax.set_xscale("log")
            vals = [f(x) for e in es if e for x in (e["lo"], e["hi"])]
            wide = max(vals) / max(min(vals), 1e-3) > 50
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"×{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(range(len(gs)))
        ax.set_yticklabels(labels if ax is axes[0][0] else [""] * len(gs), fontsize=8)
        ax.set_ylim(-0.6, len(gs) - 0.4)
        ax.invert_yaxis()
        ax.set_xlabel("flip-rate change (pp)" if flips else
                      f"{METRIC_NAMES[k]}: B / A" if ratio else f"{METRIC_NAMES[k]}: change (%)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{switch}: effect of arm B vs arm A, 95% bootstrap CI", fontsize=10)
    png = _fig_png(fig)
    plt.close(fig)
    return png


def _esc(s: str) -> str:
    import html
    return html.escape(str(s))


def _jobs_text(res: AblationResult) -> str:
    return f" with {res.jobs} worker processes" if res.jobs > 1 else ""


def markdown(res: AblationResult) -> str:
    lines = ["# gdncheck ablate", "",
             f"Device `{res.device}`, suites {', '.join(res.suites) or '-'}, {res.seeds} seeds per case, "
             f"backends {', '.join(res.backends)}; {res.wall_s:.1f} s{_jobs_text(res)}.", "",
             "Effect = arm B vs arm A on the same inputs (paired by digest), mean over cases of the "
             "per-unit relative error change `rel_l2(B)/rel_l2(A) - 1`, and the change of the argmax-flip "
             "rate (percentage points); 95% percentile bootstrap over cases, then seeds.", ""]
    for sw in res.switches:
        gs = [g for g in res.groups if g["switch"] == sw]
        lines += [f"## {sw}", ""]
        if gs:
            lines += [f"Arms: A = {gs[0]['arms'][0]}, B = {gs[0]['arms'][1]}.", "",
                      "| backend | op | dtype | cases/units | Δ output err | Δ state err | Δ flips (pp) | out err A→B (floors) |",
                      "|---|---|---|---|---|---|---|---|"]
            for g in gs:
                e = g["effects"]
                c = lambda k: fmt_effect(e.get(k), k == "flips")  # noqa: E731
                am = g["arm_means"].get("o", {})
                fl = (f"{am['A']['in_floors']:.2f} → {am['B']['in_floors']:.2f}"
                      if am and am["A"]["in_floors"] is not None and am["B"]["in_floors"] is not None else "-")
                n = next(iter(e.values()), {}).get("n_cases", "?")
                lines.append(f"| {g['backend']} | {g['op']} | {g['dtype']} | {n}/{g['units']} | {c('o')} | "
                             f"{c('state')} | {c('flips')} | {fl} |")
            lines += ["", "Verdicts:", ""] + [f"- {g['verdict']}" for g in gs] + [""]
            lines += ["How each backend expresses the switch:", ""]
            seen = {}
            for g in gs:
                seen.setdefault(g["backend"], set()).update(g["mechanism"])
            lines += [f"- {b}: {'; '.join(sorted(m))}" for b, m in seen.items()] + [""]
        sk = [s for s in res.skipped if s["switch"] == sw]
        if sk:
            lines += ["Not run:", ""] + [f"- {s['backend']}: {s['status']} ({s['units']} units): {s['reason']}"
                                          for s in sk] + [""]
        if not gs and not sk:
            lines += ["No units.", ""]
    return "\n".join(lines)


def html_report(res: AblationResult) -> str:
    md = markdown(res)
    body = [f"<h1>gdncheck ablate</h1><p>Device <code>{_esc(res.device)}</code>, "
            f"{res.seeds} seeds per case, backends {_esc(', '.join(res.backends))}; {res.wall_s:.1f} s"
            f"{_esc(_jobs_text(res))}.</p>"]
    for sw in res.switches:
        gs = [g for g in res.groups if g["switch"] == sw]
        body.append(f"<h2>{_esc(sw)}</h2>")
        png = plot_switch(res.groups, sw)
        if png:
            body.append(f'<img alt="{_esc(sw)} effects" src="data:image/png;base64,{png}"/>')
        if gs:
            body.append("<ul>" + "".join(f"<li>{_esc(g['verdict'])}</li>" for g in gs) + "</ul>")
        sk = [s for s in res.skipped if s["switch"] == sw]
        if sk:
            body.append("<p>Not run:</p><ul>" + "".join(
                f"<li>{_esc(s['backend'])}: {_esc(s['status'])} ({s['units']} units): {_esc(s['reason'])}</li>"
                for s in sk) + "</ul>")
    body.append(f"<details><summary>Markdown</summary><pre>{_esc(md)}</pre></details>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "img{max-width:100%}code,pre{background:#f4f4f4}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>gdncheck ablate</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def write_report(res: AblationResult, out: Path) -> list[Path]:
    """``ablation.json``, ``ablation.md``, ``ablation.html`` (self-contained) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "ablation.json", out / "ablation.md", out / "ablation.html"]
    paths[0].write_text(json.dumps(res.to_json(), indent=1, default=str))
    paths[1].write_text(markdown(res))
    paths[2].write_text(html_report(res))
    return paths


# ============================================================================ CLI
