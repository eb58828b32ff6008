"""Hypothesis strategies over :class:`~gdncheck.cases.Case`, and the settings profiles.

``cases(backend)`` draws only what the backend declares it can run (``Backend.caps``): the
choices are built from the capabilities, and ``backend.supports`` is the last-resort filter for
rules the capabilities cannot express. Compile-time keys of the real kernels (T of verify,
``scale``, head counts, K/V) come from small fixed sets so a fuzz run costs a bounded number of
compiles; everything else (lengths, batch, slots, padding, seeds, gate ranges) is free.

Shrinking goes toward: fewer and shorter sequences, no pool, no padding, the first entry of
every choice list, seed 0, so a failure shrinks to the smallest case that still fails.

Profiles (``load_profile``): ``dev`` (default), ``ci`` (derandomized, no example database,
bounded), ``nightly`` (many examples). ``GDNCHECK_PROFILE`` picks one; ``CI`` set picks ``ci``.
"""
from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Iterable, Iterator

from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

from gdncheck.data.case import Case

if TYPE_CHECKING:
    from gdncheck.backends.base import Backend

OPS = ("decode", "prefill", "verify")
# (H, HV) pairs: GVA ratios 1, 2, 3, 4 (Qwen shapes per TP rank are of this form), GQA last.
HEADS = ((1, 1), (1, 2), (2, 4), (2, 6), (1, 4), (4, 8), (4, 12), (2, 2), (4, 2))
DIMS = (16, 32, 64, 128)
SCALES = (None, 0.25)
VERIFY_T = (2, 3, 4, 8)

_PROFILES = {
    "dev": dict(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    "ci": dict(max_examples=25, derandomize=True, database=None, deadline=None, print_blob=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
    "nightly": dict(max_examples=1000, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]),
}
_registered = False


def register_profiles() -> None:
    """Register ``dev``, ``ci`` and ``nightly`` with Hypothesis (idempotent)."""
    global _registered
    if not _registered:
        for name, kw in _PROFILES.items():
            settings.register_profile(name, **kw)
        _registered = True


def profile_name(explicit: str | None = None) -> str:
    """``explicit``, else ``$GDNCHECK_PROFILE``, else ``ci`` when ``$CI`` is set, else ``dev``."""
    name = explicit or os.environ.get("GDNCHECK_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
    if name not in _PROFILES:
        raise ValueError(f"profile {name!r}: expected one of {', '.join(_PROFILES)}")
    return name


def load_profile(name: str | None = None) -> str:
    """Register the profiles and load the chosen one (see :func:`profile_name`); returns its name."""
    register_profiles()
    name = profile_name(name)
    settings.load_profile(name)
    return name


def _keep(values: Iterable, allowed: set | None):
    """``values`` (order kept: the first is the shrink target) restricted to ``allowed`` (empty = all)."""
    return [v for v in values if not allowed or v in allowed]


class _Draws:
    """Choice source of :func:`build_case`: Hypothesis ``draw`` (shrinkable) or a seeded RNG (fast)."""

    def __init__(self, draw=None, rng: random.Random | None = None):
        self.draw, self.rng = draw, rng

    def one(self, values):
        values = list(values)
        return self.draw(st.sampled_from(values)) if self.draw else self.rng.choice(values)

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi)) if self.draw else self.rng.randint(lo, hi)

    def boolean(self) -> bool:
        return self.draw(st.booleans()) if self.draw else self.rng.random() < 0.5

    def bools(self, n: int) -> list[bool]:
        if self.draw:
            return self.draw(st.lists(st.booleans(), min_size=n, max_size=n))
        return [self.rng.random() < 0.5 for _ in range(n)]

    def permutation(self, values) -> list:
        if self.draw:
            return self.draw(st.permutations(list(values)))
        out = list(values)
        self.rng.shuffle(out)
        return out


def build_case(
    d: _Draws,
    backend: "Backend | None" = None,
    *,
    ops: Iterable[str] = OPS,
    max_tokens: int = 160,
    max_batch: int = 8,
    heads: Iterable[tuple[int, int]] = HEADS,
    dims: Iterable[int] = DIMS,
    scales: Iterable[float | None] = SCALES,
    verify_T: Iterable[int] = VERIFY_T,
    max_pool_extra: int = 6,
    dtypes: Iterable[str] | None = None,
    edge_values: bool = False,
) -> Case | None:
    """One case from the choices of ``d``; None when ``backend.supports`` rejects it.

    Arguments as :func:`cases`; ``edge_values`` also draws the edge gate distributions and value
    edges of :mod:`gdncheck.edges` (off by default: the draws of a seed stay as they were).
    """
    caps = backend.caps if backend is not None else None

    def pick(values, allowed=None, what="value"):
        vals = _keep(values, allowed)
        if not vals:
            raise ValueError(f"cases: no {what} left after the backend's capabilities "
                             f"({backend.name if backend else '-'}): {list(values)} vs {sorted(allowed or [])}")
        return d.one(vals)

    op = pick(ops, caps.ops if caps else None, "op")
    hp = [(h, hv) for h, hv in heads
          if caps is None or ((caps.gva or hv <= h) and (caps.gqa or h <= hv))]
    H, HV = pick(hp, None, "head pair")
    K = pick(dims, caps.K if caps else None, "K")
    V = pick(dims, caps.V if caps else None, "V")
    dtype = pick(list(dtypes or ("bfloat16", "float16", "float32")), caps.dtypes if caps else None, "dtype")
    state_dtype = pick(("float32", "bfloat16", "float16"), caps.state_dtypes if caps else None, "state dtype")
    layout = pick(("k_last", "v_last"), caps.layouts if caps else None, "layout")
    gate_source = pick(("precomputed", "raw"), caps.gate_sources if caps else None, "gate source")
    l2norm = pick((True, False), caps.l2norm if caps else None, "l2norm")
    scale = pick(list(scales) if caps is None or caps.custom_scale else [None], None, "scale")

    # Sequences: prefill lengths share a token budget; decode T = 1; verify one T per batch.
    if op == "prefill":
        N = d.integer(1, max(1, min(max_batch, max_tokens))) if (caps is None or caps.varlen) else 1
        seqlens, budget = [], max_tokens
        for _ in range(N):
            s = d.integer(0, max(0, budget))
            seqlens.append(s)
            budget -= s
    elif op == "decode":
        seqlens = [1] * d.integer(1, max(1, min(max_batch, max_tokens)))
    else:
        T = pick(verify_T, None, "verify T")
        seqlens = [T] * d.integer(1, max(1, min(max_batch, max_tokens // T)))
    N = len(seqlens)

    # State: plain [N, ...] or a pool with slots, padding and separate write slots.
    use_pool = (caps is None or caps.pool) and d.boolean()
    pool_size = read = write = None
    pool_strided = disable = False
    intermediate = op == "verify" and (caps is None or caps.intermediate) and d.boolean()
    if use_pool:
        can_pad = op != "prefill"
        if can_pad and backend is not None:
            probe = Case(op=op, seqlens=seqlens, H=H, HV=HV, K=K, V=V, dtype=dtype, state_dtype=state_dtype,
                         layout=layout, gate_source=gate_source, l2norm=l2norm, scale=scale,
                         pool_size=N, read_indices=list(range(N)))
            can_pad = backend.policy(probe) in caps.padding
        pad = d.bools(N) if can_pad else [False] * N
        extra = d.integer(0, max_pool_extra)
        # Slot 0 is the reserved dummy slot whenever a row is padded (null_slot policies use it).
        first = 1 if any(pad) else d.integer(0, 1)
        P = first + N + extra
        read = [-1 if p else s for p, s in zip(pad, d.permutation(range(first, P))[:N])]
        if d.boolean():
            write = d.permutation(range(first, P))[:N]
        pool_size = P
        pool_strided = (caps is None or caps.strided_pool) and d.boolean()
        if op != "prefill" and (caps is None or caps.disable_state_update):
            disable = d.boolean()

    gate_strided = (caps is None or caps.strided_gates) and d.boolean()
    gate_dist = d.one(("model", "alpha_one", "alpha_tiny", "softplus_high", "softplus_low", "beta_zero", "beta_one"))
    v_scale = d.one((1.0, 10.0, 0.1, 100.0))
    # Without the L2 norm, beta * |k|^2 <= 2 keeps the delta rule contractive: |k|^2 ~ K qk^2.
    qk_scale = d.one((1.0, 3.0)) if l2norm else round(0.5 / K ** 0.5, 6)
    state_scale = d.one((0.3, 0.0, 1.0))
    seed = d.integer(0, 2**31 - 1)
    value_edge = None
    if edge_values:
        from gdncheck.edges import EDGE_GATE_DISTS, VALUE_EDGES
        gate_dist = d.one((gate_dist, *EDGE_GATE_DISTS))
        value_edge = d.one((None, *VALUE_EDGES))
        if value_edge == "poison_padding" and not any(r < 0 for r in (read or [])):
            value_edge = None
    case = Case(op=op, seqlens=seqlens, H=H, HV=HV, K=K, V=V, dtype=dtype,
                gate_dtype=dtype if dtype != "float32" else "bfloat16", state_dtype=state_dtype, layout=layout,
                scale=scale, l2norm=l2norm, gate_source=gate_source, gate_dist=gate_dist, v_scale=v_scale,
                qk_scale=qk_scale, state_scale=state_scale, pool_size=pool_size, read_indices=read,
                write_indices=write, disable_state_update=disable, intermediate=intermediate,
                pool_strided=pool_strided, gate_strided=gate_strided, seed=seed, tags=["fuzz"],
                value_edge=value_edge)
    if backend is not None and backend.supports(case) is not None:
        return None
    return case


@st.composite
def cases(draw, backend: "Backend | None" = None, **kw) -> Case:
    """Strategy of :class:`Case` the backend (if given) declares it can run.

    Keywords (all optional): ``ops``; ``max_tokens`` (bound on tokens in all, prefill, or
    ``B * T``); ``max_batch`` (N); ``heads`` ((H, HV) pairs); ``dims`` (K and V values, drawn
    independently); ``scales`` (None = K ** -0.5); ``verify_T``; ``max_pool_extra`` (unused pool
    slots); ``dtypes`` (q/k/v dtypes). Compile-time keys come only from these finite sets.
    """
    case = build_case(_Draws(draw=draw), backend, **kw)
    assume(case is not None)
    return case


def random_cases(n: int, seed: int = 0, backend: "Backend | None" = None, **kw) -> Iterator[Case]:
    """``n`` cases from the same space as :func:`cases`, drawn with a seeded RNG (no shrinking,
    ~100x faster than Hypothesis: for soak runs and bulk checks). Rejected draws are redrawn."""
    rng = random.Random(seed)
    made = tries = 0
    while made < n:
        tries += 1
        if tries > 50 * n + 100:
            raise ValueError("random_cases: the backend rejects almost every draw")
        c = build_case(_Draws(rng=rng), backend, **kw)
        if c is not None:
            made += 1
            yield c


@st.composite
def api_cases(draw, entry: str = "chunk_gated_delta_rule") -> Case:
    """Strategy of cases that pin argument values of a FlashInfer entry point: one expressible
    combination of :data:`gdncheck.api_suite.DIMS` (documented-invalid ones included: the backend
    must reject them), built as the ``api`` suite builds its cases, with a drawn seed."""
    from gdncheck.api_suite import DIMS, _expressible_shape, case_of

    combo = {}
    for name, values in DIMS[entry]:
        ok = [v for v in values if _expressible_shape(entry, {**combo, name: v})]
        assume(ok)
        combo[name] = draw(st.sampled_from(ok))
    assume(_expressible_shape(entry, combo))
    e = case_of(entry, combo, 0)
    e["seed"] = draw(st.integers(0, 2**31 - 1))
    e["tags"] = e["tags"] + ["fuzz"]
    return Case(**e)
