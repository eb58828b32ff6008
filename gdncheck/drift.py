"""Error drift: along long sequences, over long decode rollouts, and at the logits.

position
    One prefill of ``T`` tokens (up to 16384); relative L2 error of the output per position bin,
    with the rounding floor of the same tokens (``rel_l2(round(ref, dtype), ref)``) beside it.
rollout
    ``steps`` (>= 1000 in real use) decode calls in which each implementation carries *its own*
    state from step to step (rounded to the pool's ``state_dtype``, as a serving engine stores
    it), against a float64 rollout from the same initial state. The state error is logged at
    geometrically spaced steps and summarised by its **growth exponent**: the least-squares slope
    of ``log(state rel_l2)`` against ``log(step)`` over steps >= 10. About 0 means bounded error
    (the decay forgets old rounding), 0.5 a random walk of independent roundings, 1 linear growth
    (a bias accumulating every step).
logits
    A fixed seeded Gaussian projection ``W [HS*V, vocab] / sqrt(HS*V)`` of every token's output
    to a vocabulary of 32k-152k entries; the **argmax flip rate** is the fraction of tokens whose
    argmax differs between the backend's output and the oracle's (both projected in float64, so
    flips come from the output alone). ``W`` is drawn block by block from
    ``seed + block index`` on the device, so memory stays bounded at any vocabulary size.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from gdncheck.backends.base import Backend
from gdncheck.data.case import Case
from gdncheck.inputs import DTYPES, Inputs, materialize
from gdncheck.metrics import rel_l2
from gdncheck.oracle import expected, gates64
from gdncheck_reference import gated_delta_rule
from gdncheck.data.drift import DriftResult, PositionCurve, RolloutCurve, load_drift  # noqa: F401

F64 = torch.float64

# --------------------------------------------------------------------------- helpers

def _device(backend: Backend, device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    want = getattr(backend.caps, "device", "cpu") or "cpu"
    return torch.device("cuda" if want.startswith("cuda") and torch.cuda.is_available() else "cpu")


def _derive(template: Case, **update) -> Case:
    """A validated copy of ``template`` with ``update`` applied (name/tags dropped)."""
    d = template.model_dump()
    d.update(pool_size=None, read_indices=None, write_indices=None, padding=None, intermediate=False,
             disable_state_update=False, pool_strided=False, gate_strided=False, tags=[])
    d.update(update)
    return Case(**d)


def _layout_for(backend: Backend, case: Case) -> Case:
    """Switch the case to the backend's layout when it supports only the other one."""
    lays = backend.caps.layouts
    if lays and case.layout not in lays:
        return _derive(case, layout=sorted(lays)[0], name=case.name)
    return case


_PROJ_CACHE: dict = {}
_PROJ_CACHE_BYTES = 3 << 29  # 1.5 GiB: fits a 4096-wide output (HV = 32, V = 128) x 32k vocab


def _projection(D: int, vocab: int, seed: int, block: int, dev: torch.device) -> list[torch.Tensor]:
    """Blocks ``[D, block]`` fp32 of the fixed logit projection (seeded per block, scaled by
    ``1/sqrt(D)``), cached per width up to a memory budget: ablations reuse it across cases."""
    key = (D, vocab, seed, block, str(dev))
    if key in _PROJ_CACHE:
        _PROJ_CACHE[key] = _PROJ_CACHE.pop(key)  # most recent last
        return _PROJ_CACHE[key]
    blocks = []
    for i, start in enumerate(range(0, vocab, block)):
        w = min(block, vocab - start)
        gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + i)
        blocks.append(torch.randn(D, w, generator=gen, device=dev, dtype=torch.float32) / math.sqrt(D))
    size = D * vocab * 4
    if size <= _PROJ_CACHE_BYTES:
        while _PROJ_CACHE and size + sum(k[0] * k[1] * 4 for k in _PROJ_CACHE) > _PROJ_CACHE_BYTES:
            _PROJ_CACHE.pop(next(iter(_PROJ_CACHE)))
        _PROJ_CACHE[key] = blocks
    return blocks


def logit_argmax(x: torch.Tensor, vocab: int = 32768, *, seed: int = 0, block: int = 8192,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``argmax(flatten(x) @ W)`` per row ``[n]``, ``W`` the fixed random projection to ``vocab``.

    ``dtype`` of the product: fp32 rounding (~1e-7 relative) is far below the bf16-sized output
    differences being compared; :func:`logit_flip_rate` uses float64 for the oracle's side too.

    Args:
        x: ``[n, ...]`` one row per token, any float dtype.
    """
    n = x.shape[0]
    dev = x.device
    a = x.reshape(n, -1).to(dtype)
    arg = torch.zeros(n, dtype=torch.int64, device=dev)
    if n == 0:
        return arg
    best = torch.full((n,), -math.inf, dtype=dtype, device=dev)
    for i, W in enumerate(_projection(a.shape[1], vocab, seed, block, dev)):
        val, idx = (a @ W.to(dtype)).max(dim=1)
        upd = val > best
        best[upd] = val[upd]
        arg[upd] = idx[upd] + i * block
    return arg


def logit_flip_rate(o: torch.Tensor, ref: torch.Tensor, vocab: int = 32768, *, seed: int = 0,
                    block: int = 8192) -> float:
    """Fraction of tokens whose argmax over ``flatten(o) @ W`` differs from the oracle's (float64).

    Args:
        o: ``[n, ...]`` the backend's outputs (one row per token), any float dtype.
        ref: ``[n, ...]`` float64 oracle outputs.
        vocab: projection width (32k-152k for real vocabularies).
    """
    if o.shape[0] == 0:
        return 0.0
    arg_a = logit_argmax(o, vocab, seed=seed, block=block, dtype=F64)
    arg_r = logit_argmax(ref.to(o.device), vocab, seed=seed, block=block, dtype=F64)
    return float((arg_a != arg_r).double().mean().item())


def growth_exponent(steps: list[int], errs: list[float], min_step: int = 10) -> float | None:
    """Least-squares slope of log(err) vs log(step) over steps >= ``min_step`` with err > 0."""
    pts = [(math.log(s), math.log(e)) for s, e in zip(steps, errs)
           if s >= min_step and e is not None and e > 0 and math.isfinite(e)]
    if len(pts) < 3:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return None if sxx == 0 else sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# --------------------------------------------------------------------------- position

def position_error(backend: Backend, case_template: Case, T: int, bins: int = 32, *, device: str | None = None,
                   vocab: int = 32768, proj_seed: int = 0) -> PositionCurve:
    """Output error per position bin of one prefill of ``T`` tokens (a single sequence).

    ``case_template`` gives heads, dims, dtypes, layout, gates and seed; its op and lengths are
    replaced. Returns an ``unsupported`` / ``error`` curve rather than raising.
    """
    case = _layout_for(backend, _derive(case_template, op="prefill", seqlens=[T], name=f"position T={T}"))
    curve = PositionCurve(backend=backend.name, T=T, case=case, vocab=vocab)
    why = backend.available() or backend.supports(case)
    if why:
        curve.status, curve.reason = "unsupported", why
        return curve
    dev = _device(backend, device)
    t0 = time.perf_counter()
    try:
        inputs = materialize(case, dev)
        exp = expected(inputs.clone(), backend.policy(case), backend.zero_length_policy, device=dev)
        out = backend.run(inputs)
        _sync(dev)
    except Exception as e:  # noqa: BLE001 - the curve records the failure
        curve.status, curve.reason = "error", f"{type(e).__name__}: {e}"
        return curve
    o, ref = out.o[0], exp.o[0].to(dev)  # [T, HS, V]
    dt = DTYPES[case.dtype]
    edges = sorted({round(i * T / bins) for i in range(bins + 1)})
    curve.bin_edges = edges
    for lo, hi in zip(edges[:-1], edges[1:]):
        curve.rel_l2.append(rel_l2(o[lo:hi], ref[lo:hi]))
        curve.floor_rel_l2.append(rel_l2(ref[lo:hi].to(dt), ref[lo:hi]))
    curve.flip_rate = logit_flip_rate(o, ref, vocab, seed=proj_seed)
    curve.path, curve.seconds = out.path, time.perf_counter() - t0
    return curve


# --------------------------------------------------------------------------- rollout

def _log_points(steps: int, points: int) -> list[int]:
    pts = {1, steps}
    for i in range(points):
        pts.add(int(round(math.exp(math.log(steps) * i / max(1, points - 1)))))
    return sorted(p for p in pts if 1 <= p <= steps)


def _step_inputs(case: Case, src: Inputs, s: int, state: torch.Tensor) -> Inputs:
    tk = lambda t: t[:, s:s + 1].contiguous()  # noqa: E731
    B, HS, V = case.N, case.HS, case.V
    return Inputs(case=case, q=tk(src.q), k=tk(src.k), v=tk(src.v), A_log=src.A_log, dt_bias=src.dt_bias,
                  a=tk(src.a), b=tk(src.b), g=tk(src.g), beta=tk(src.beta), cu_seqlens=None, state=state,
                  read_indices=None, write_indices=None,
                  out=torch.full((B, 1, HS, V), float("nan"), dtype=src.q.dtype, device=src.q.device),
                  intermediate=None)


def rollout(backend: Backend, case_template: Case, steps: int = 1000, *, state_dtype: str | None = None,
            points: int = 40, device: str | None = None, vocab: int = 32768, proj_seed: int = 0) -> RolloutCurve:
    """``steps`` decode calls feeding the backend's own state back, against a float64 rollout.

    ``case_template``: its N = len(seqlens) sequences, heads, dims, dtypes, layout, gates and seed
    are used; ``state_dtype`` overrides the template's. Token inputs of all steps are drawn once
    (as a verify case of T = ``steps``) and fed one step at a time.
    """
    sdt_name = state_dtype or case_template.state_dtype
    N = case_template.N
    step_case = _layout_for(backend, _derive(case_template, op="decode", seqlens=[1] * N, state_dtype=sdt_name,
                                             name=f"rollout {steps} steps"))
    curve = RolloutCurve(backend=backend.name, state_dtype=sdt_name, steps=steps, case=step_case, vocab=vocab)
    why = backend.available() or backend.supports(step_case)
    if why:
        curve.status, curve.reason = "unsupported", why
        return curve
    dev = _device(backend, device)
    src_case = _derive(step_case, op="verify", seqlens=[max(2, steps)] * N, name=step_case.name)
    src = materialize(src_case, dev)
    g64, beta64 = gates64(src)
    sdt = DTYPES[sdt_name]
    S64 = src.state.to(F64)
    carry = src.state.clone()
    o_all = torch.empty(N, steps, step_case.HS, step_case.V, dtype=src.q.dtype, device=dev)
    o_ref = torch.empty(N, steps, step_case.HS, step_case.V, dtype=F64, device=dev)
    t0 = time.perf_counter()
    prev = 0
    try:
        for p in _log_points(steps, points):
            res = gated_delta_rule(src.q[:, prev:p], src.k[:, prev:p], src.v[:, prev:p], g64[:, prev:p],
                                   beta64[:, prev:p], scale=step_case.scale, initial_state=S64,
                                   use_qk_l2norm=step_case.l2norm, layout=step_case.layout)
            S64 = res.final_state
            o_ref[:, prev:p] = res.o
            for s in range(prev, p):
                out = backend.run(_step_inputs(step_case, src, s, carry))
                if out.state is None:
                    raise RuntimeError("backend returned no state")
                carry = out.state.to(sdt)
                o_all[:, s] = out.o[:, 0]
                curve.path = out.path
            curve.log_steps.append(p)
            curve.state_rel_l2.append(rel_l2(carry, S64))
            curve.state_floor.append(rel_l2(S64.to(sdt), S64))
            curve.o_rel_l2.append(rel_l2(o_all[:, prev:p], o_ref[:, prev:p]))
            prev = p
        _sync(dev)
    except Exception as e:  # noqa: BLE001 - the curve records the failure
        curve.status, curve.reason = "error", f"{type(e).__name__} at step {prev}: {e}"
        return curve
    curve.growth = growth_exponent(curve.log_steps, curve.state_rel_l2)
    curve.growth_o = growth_exponent(curve.log_steps, curve.o_rel_l2)
    curve.flip_rate = logit_flip_rate(o_all.reshape(N * steps, -1), o_ref.reshape(N * steps, -1), vocab,
                                      seed=proj_seed)
    curve.seconds = time.perf_counter() - t0
    return curve


# --------------------------------------------------------------------------- CLI

def _template(H, HV, K, V, dtype, state_dtype, layout, gate_source, gate_dist, seed, N=1) -> Case:
    return Case(op="decode", seqlens=[1] * N, H=H, HV=HV, K=K, V=V, dtype=dtype, state_dtype=state_dtype,
                layout=layout, gate_source=gate_source, gate_dist=gate_dist, seed=seed)
