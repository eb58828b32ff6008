"""Precision twins: the oracle's algorithm re-run on the CPU with a kernel family's rounding points.

A twin is what a correct kernel of a family would compute, up to the order of fp32 sums: the
same gate arithmetic, the same values stored in low precision between stages, the same state
dtype between calls. Comparing a twin with the float64 oracle gives the error floor a real
kernel of that family should reach; the planted-fault backends (:mod:`gdncheck.backends.faults`)
are twins with one bug each.

Rounding points modelled (read from the kernels' sources), for input dtype ``dt`` (bf16/fp16/fp32):

``twin-fla`` (FLA 0.6.0)
    prefill = ``chunk_gated_delta_rule``: normalised q/k, ``(I + A)^-1``, ``w``, ``u``, the
    per-chunk states ``h`` and ``v_new`` stored in ``dt``; running state carried in fp32; the
    intra-chunk score matrix cast to ``dt`` before its product with ``v_new``.
    decode/verify = ``fused_recurrent``: ``dt`` inputs loaded, everything else fp32 in registers;
    the final state is fp32 and the adapter casts it to the state dtype once.
``twin-flashinfer`` (FlashInfer 0.7.2.post1, SM90)
    prefill = chunk kernel: as FLA's rounding of MMA operands (q/k, ``w``, ``u``, state fed to
    the MMA in ``dt``, running state fp32), but ``(I + A)`` and its inverse held in **fp16**.
    decode/verify = decode/MTP kernels: gates in kernel in fp32 (beta not rounded), fp16 inputs
    rounded to bf16 first and the output computed in bf16 (fp32 inputs, which the kernel does
    not take, stay fp32 here); with a non-fp32 state the state is rounded
    to the state dtype after every token (the bf16 path stores it per step).

Both take raw (``A_log, a, dt_bias, b``) or precomputed (fp32 ``g``, ``beta``) gates, pools with
read/write indices (gathered and scattered here, per the family's padding policy), both layouts,
GVA/GQA, varlen with zero-length sequences, and intermediate states for verify.

Knobs (constructor keywords; defaults are the kernel family's behaviour):

- ``beta_dtype``: None, "bfloat16" or "float16": round beta before use (SGLang's extend path
  rounds it to bf16; neither kernel does).
- ``exp_dtype``: "float32" or "bfloat16": precision of ``alpha = exp(g)``. With "bfloat16" the
  log decay becomes ``log(alpha_bf16)`` everywhere, matching the oracle's ``exp_dtype`` ablation.
- ``compute_dtype``: "float32" (kernels) or "float64" (a twin without arithmetic rounding, for
  isolating the storage roundings).
- ``state_dtype``: None = the case's state dtype; else the dtype the state is rounded to
  between calls (and per step on the per-step paths) while the pool keeps the case's dtype.
- ``l2norm_in_kernel``: True = q/k normalised in fp32 inside the kernel; False = the adapter
  normalises in fp32 and rounds to the input dtype before the call.
- ``fast_math``: False. True models ``__expf``/``__logf`` (``exp(x) = 2^fp32(x*log2 e)``):
  FlashInfer's decode kernels use them, but their error (a few fp32 ulp on the gates) is far
  below the bf16 output floor, so the default leaves them off.
- ``padding``: per-op padding policy override, e.g. ``{"decode": "null_slot"}``.
- ``inv_dtype``: dtype ``(I + A)`` and its inverse are held in (prefill); None = the family's
  (FLA: the store dtype, FlashInfer: fp16).
- ``store_dtype``: dtype of the values kept between stages of the chunked form (normalised
  q/k are still the input dtype); None = the input dtype (both families); "float32" models a
  kernel that keeps them in fp32.
- ``per_step_state_round``: round a non-fp32 state after every token on decode/verify; None =
  the family's (FLA no, FlashInfer yes).
- ``bf16_output``: decode/verify load fp16 inputs as bf16 and produce the output in bf16; None
  = the family's (FLA no, FlashInfer yes). Invisible with bf16 inputs (the output is bf16 anyway).
- ``raw_gate_math``: "float32" (gates computed from raw ``a, b`` in fp32 in the kernel) or
  "exact" (the case's fp32 ``g``, ``beta``, rounded once from float64, as an adapter that
  precomputes gates exactly would pass them). Only raw-gate cases see it.

A case that names a ``padding`` policy gets it (a twin can emulate all three); otherwise the
family's policy applies: FlashInfer decode fp32 T=1 ``skip``, non-fp32 state ``null_slot``,
verify (MTP, fp32 pool) ``caller_value``, prefill ``skip``. FLA has no pool indexing: its
adapter gathers only live rows and zero-fills padded rows' outputs, hence ``skip`` everywhere.
Zero-length sequences pass their initial state through to the write slot.

Padded rows still run (from a zero state, or slot 0 under ``null_slot``), as the oracle does, so
that intermediate states of every row are defined; only their output and pool writes follow
the policy.

Internally states are V-last ``[.., K, V]`` in the compute dtype; pool rows are converted on
gather and scatter only. The methods prefixed ``_`` are the hooks the fault backends override.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gdncheck.backends.base import Backend, Capabilities, Outputs
from gdncheck.data.case import Case
from gdncheck.inputs import Inputs
from gdncheck_reference import from_v_last, to_v_last

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}
_LOG2E = torch.tensor(1.0 / math.log(2.0), dtype=torch.float32)
_LN2 = torch.tensor(math.log(2.0), dtype=torch.float32)
# exp(-1e4) is 0 in fp32 too; the clamp keeps chunk cumsums of -inf gates finite (as the oracle).
_G_MIN = -1.0e4
CHUNK = 64


def _dt(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"{what}: one of {sorted(_DTYPES)} or None, got {name!r}")
    return _DTYPES[name]


def rnd(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (nearest even) and back to ``x.dtype``; None or wider: ``x``."""
    if dtype is None or dtype == x.dtype or dtype == torch.float64:
        return x
    return x.to(dtype).to(x.dtype)


@dataclass
class Plan:
    """Where each sequence's tokens are and which pool slots it reads and writes.

    ``starts``/``lens``: flat token offsets into ``B*T``. ``src``: slot read (None = zero state).
    ``dst``: slot written (None = no write). ``padded``: the row is padding.
    """

    starts: list[int]
    lens: list[int]
    src: list[int | None]
    dst: list[int | None]
    padded: list[bool]


class _Twin(Backend):
    """Shared machinery of the precision twins (see the module docstring)."""

    family = "twin"
    caps = Capabilities(gqa=True, device="any")
    ablation_knobs = frozenset({"beta-quant", "exp-precision", "state-dtype", "gate-source", "l2norm", "fast-math"})
    zero_length_policy = "passthrough"
    # family specifics, set by subclasses
    _inv_dtype: torch.dtype | None = None  # dtype of (I + A)^-1 in prefill; None = input dtype
    _per_step_state_round = False  # decode/verify round a non-fp32 state after every token
    _bf16_output = False  # decode/verify compute the output in bf16

    def __init__(self, *, beta_dtype: str | None = None, exp_dtype: str = "float32",
                 compute_dtype: str = "float32", state_dtype: str | None = None,
                 l2norm_in_kernel: bool = True, fast_math: bool = False,
                 padding: dict[str, str] | None = None, inv_dtype: str | None = None,
                 store_dtype: str | None = None, per_step_state_round: bool | None = None,
                 bf16_output: bool | None = None, raw_gate_math: str = "float32"):
        self.beta_dtype = _dt(beta_dtype, "beta_dtype")
        self.exp_dtype = _dt(exp_dtype, "exp_dtype")
        if self.exp_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"exp_dtype: float32, bfloat16, float16 or float64, got {exp_dtype!r}")
        self.cdt = _dt(compute_dtype, "compute_dtype")
        if self.cdt not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype: float32 or float64, got {compute_dtype!r}")
        self.state_dtype = _dt(state_dtype, "state_dtype")
        self.l2norm_in_kernel = bool(l2norm_in_kernel)
        self.fast_math = bool(fast_math)
        self._padding = dict(padding or {})
        # family specifics as knobs: None keeps the class (family) value
        if inv_dtype is not None:
            self._inv_dtype = _dt(inv_dtype, "inv_dtype")
        self.store_dtype = _dt(store_dtype, "store_dtype")
        if per_step_state_round is not None:
            self._per_step_state_round = bool(per_step_state_round)
        if bf16_output is not None:
            self._bf16_output = bool(bf16_output)
        if raw_gate_math not in ("float32", "exact"):
            raise ValueError(f"raw_gate_math: float32 or exact, got {raw_gate_math!r}")
        self.raw_gate_math = raw_gate_math
        self.knobs = {"beta_dtype": beta_dtype, "exp_dtype": exp_dtype, "compute_dtype": compute_dtype,
                      "state_dtype": state_dtype, "l2norm_in_kernel": l2norm_in_kernel,
                      "fast_math": fast_math, "padding": padding, "inv_dtype": inv_dtype,
                      "store_dtype": store_dtype, "per_step_state_round": per_step_state_round,
                      "bf16_output": bf16_output, "raw_gate_math": raw_gate_math}

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return f"gdncheck-{version('gdncheck')}"
        except PackageNotFoundError:  # pragma: no cover
            return "gdncheck"

    def _family_policy(self, case: Case) -> str:
        return self.padding_policy.get(case.op, "skip")

    def policy(self, case: Case) -> str:
        if case.padding is not None:
            return case.padding
        return self._padding.get(case.op) or self._family_policy(case)

    # ------------------------------------------------------------------ elementary functions

    def _exp(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_math and x.dtype == torch.float32:  # __expf: ex2.approx(x * log2 e)
            return torch.exp2(x * _LOG2E)
        return torch.exp(x)

    def _log(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_math and x.dtype == torch.float32:  # __logf: lg2.approx(x) * ln 2
            return torch.log2(x) * _LN2
        return torch.log(x)

    # ------------------------------------------------------------------ hooks

    def _gates(self, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(g, alpha, beta)`` ``[B, T, HS]`` in the compute dtype, as the kernel uses them."""
        c, cd = inputs.case, self.cdt
        if c.gate_source == "raw" and self.raw_gate_math == "float32":
            x = inputs.a.to(cd) + inputs.dt_bias.to(cd)
            sp = torch.where(x > 20.0, x, self._log(1.0 + self._exp(torch.clamp(x, max=20.0))))
            g = -self._exp(inputs.A_log.to(cd)) * sp
            beta = self._beta_from_raw(inputs.b.to(cd))
        else:
            g, beta = inputs.g.to(cd), inputs.beta.to(cd)
        g = torch.clamp(g, min=_G_MIN)
        if self.exp_dtype in (torch.bfloat16, torch.float16):
            alpha = torch.exp(g.to(self.exp_dtype)).to(cd)
            g = torch.clamp(torch.log(alpha), min=_G_MIN)
        else:
            alpha = self._exp(g)
        beta = rnd(beta, self.beta_dtype)
        return g, alpha, beta

    def _beta_from_raw(self, b: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 + self._exp(-b))

    def _qk_head_index(self, H: int, HS: int) -> torch.Tensor:
        """q/k head read by each state head: GVA ``i // (HS / H)``."""
        return torch.arange(HS) // (HS // H)

    def _l2norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)

    def _plan(self, inputs: Inputs, policy: str) -> Plan:
        c = inputs.case
        if c.op == "prefill":
            cu = inputs.cu_seqlens.tolist()
            starts, lens = cu[:-1], [b - a for a, b in zip(cu, cu[1:])]
        else:
            starts, lens = [n * c.T for n in range(c.N)], [c.T] * c.N
        if c.pool_size is None:
            reads, writes = list(range(c.N)), list(range(c.N))
        else:
            reads = inputs.read_indices.tolist()
            writes = inputs.write_indices.tolist() if inputs.write_indices is not None else reads
        src, dst, padded = [], [], []
        null = policy == "null_slot"
        for n, (r, w) in enumerate(zip(reads, writes)):
            pad = r < 0
            s = (0 if null else None) if pad else r
            d = (0 if null else None) if (pad or w < 0) else w
            if c.disable_state_update:
                d = None
            if lens[n] == 0 and self.zero_length_policy == "untouched":
                d = None
            src.append(s)
            dst.append(d)
            padded.append(pad)
        return Plan(starts, lens, src, dst, padded)

    def _slot(self, case: Case, slot: int) -> int:
        """Pool row that slot index ``slot`` addresses."""
        return slot

    def _chunk_end_decay(self, Gc: torch.Tensor) -> torch.Tensor:
        """Log decay ``[.., C]`` -> ``[..]`` applied to the state carried into the next chunk."""
        return Gc[..., -1]

    def _out_mask(self, plan: Plan, BT: int, policy: str) -> torch.Tensor:
        """``[B*T]`` bool: output tokens the kernel writes."""
        m = torch.zeros(BT, dtype=torch.bool)
        for s, n, p in zip(plan.starts, plan.lens, plan.padded):
            if not (p and policy == "caller_value"):
                m[s:s + n] = True
        return m

    def _store_states(self, pool: torch.Tensor, rows: list[int], S: torch.Tensor) -> None:
        """Write final states ``S [n, HS, ..]`` (already in the pool's layout and dtype) to
        ``pool[rows]``, in sequence order (a later write to the same row wins)."""
        if len(set(rows)) == len(rows):
            pool[torch.tensor(rows, dtype=torch.long)] = S
        else:
            for i, r in enumerate(rows):
                pool[r] = S[i]

    def _store_intermediate(self, buf: torch.Tensor, inter: torch.Tensor, layout: str) -> None:
        buf.copy_(from_v_last(inter, layout).to(buf.dtype))

    def _after(self, inputs: Inputs, pool: torch.Tensor, plan: Plan, S: torch.Tensor) -> None:
        """Hook run after the pool writes (faults that touch extra rows)."""

    # ------------------------------------------------------------------ run

    def _path(self, case: Case) -> str:
        return f"{case.op}.{'chunk' if case.op == 'prefill' else 'recurrent'}"

    def run(self, inputs: Inputs) -> Outputs:
        # tensors the twin creates (masks, index maps, buffers) go where the inputs are: the same
        # arithmetic runs on the CPU (CI) and beside a kernel on its GPU
        with torch.device(inputs.q.device):
            return self._run(inputs)

    def _run(self, inputs: Inputs) -> Outputs:
        c, cd = inputs.case, self.cdt
        policy = self.policy(c)
        B, T, H, HV, HS, K, V, N = c.B, c.T, c.H, c.HV, c.HS, c.K, c.V, c.N
        chunked = c.op == "prefill"
        in_dt = inputs.q.dtype
        # dtype the kernel holds q/k/v in
        ld_dt = torch.bfloat16 if (self._bf16_output and not chunked and in_dt == torch.float16) else in_dt
        st_dt = self.state_dtype or inputs.state.dtype  # state dtype between calls / per step
        plan = self._plan(inputs, policy)

        g, alpha, beta = self._gates(inputs)
        q = inputs.q.to(ld_dt).to(cd)
        k = inputs.k.to(ld_dt).to(cd)
        v = inputs.v.to(ld_dt).to(cd)
        if c.l2norm:
            if self.l2norm_in_kernel:
                q, k = self._l2norm(q), self._l2norm(k)
            else:  # adapter normalises, the kernel gets input-dtype tensors
                q, k = rnd(self._l2norm(q.float()).to(cd), in_dt), rnd(self._l2norm(k.float()).to(cd), in_dt)
        if chunked:  # normalised q/k stored in the input dtype (MMA operands)
            q, k = rnd(q, in_dt), rnd(k, in_dt)
        scale = c.scale if c.scale else K ** -0.5
        hi = self._qk_head_index(H, HS)
        q, k = q[:, :, hi], k[:, :, hi]
        v = v.repeat_interleave(HS // HV, dim=2)

        # gather per sequence: [N, Tmax, ...]
        Tmax = max(plan.lens) if plan.lens else 0
        Tp = -(-Tmax // CHUNK) * CHUNK if chunked else Tmax
        t = torch.arange(Tp)
        lens_t = torch.tensor(plan.lens, dtype=torch.long)
        valid = t[None, :] < lens_t[:, None]
        idx = torch.where(valid, torch.tensor(plan.starts, dtype=torch.long)[:, None] + t[None, :], 0)
        idx = idx.clamp(max=max(B * T - 1, 0))

        def gat(x):
            flat = x.reshape(B * T, *x.shape[2:])
            if flat.shape[0] == 0:
                return torch.zeros(N, Tp, *x.shape[2:], dtype=x.dtype)
            out = flat[idx]
            return out * valid.view(N, Tp, *([1] * (out.dim() - 2)))

        qs, ks, vs, gs, als, bs = (gat(x) for x in (q, k, v, g, alpha, beta))
        pool = inputs.state if c.pool_size is not None else inputs.state.clone()
        live = [n for n, s in enumerate(plan.src) if s is not None]
        S0 = torch.zeros(N, HS, K, V, dtype=cd)
        if live:
            rows = torch.tensor([self._slot(c, plan.src[n]) for n in live], dtype=torch.long)
            S0[live] = to_v_last(pool[rows].to(cd), c.layout)
        S0 = rnd(S0, st_dt)

        inter = None
        if chunked:
            o, S = self._chunked(qs, ks, vs, gs, bs, S0, scale, self.store_dtype or in_dt)
        else:
            per_step = st_dt if (self._per_step_state_round and st_dt != torch.float32) else None
            o, S, inter = self._recurrent(qs, ks, vs, als, bs, S0, scale, per_step, c.intermediate)
        if ld_dt != in_dt:  # fp16 call on a bf16-output kernel: the output is bf16 first
            o = rnd(o, torch.bfloat16)

        # outputs: padded rows per policy, written into the caller's buffer
        o_flat = torch.zeros(B * T, HS, V, dtype=cd)
        o_flat[idx[valid]] = o[valid]
        if policy == "skip":
            for s_, n_, p in zip(plan.starts, plan.lens, plan.padded):
                if p:
                    o_flat[s_:s_ + n_] = 0.0
        mask = self._out_mask(plan, B * T, policy)
        out_flat = inputs.out.view(B * T, HS, V)
        out_flat[mask] = o_flat[mask].to(in_dt)
        if c.intermediate and inputs.intermediate is not None and inter is not None:
            self._store_intermediate(inputs.intermediate, inter, c.layout)

        S = rnd(S, st_dt)
        wn = [n for n, d in enumerate(plan.dst) if d is not None]
        if wn:
            Sw = from_v_last(S[wn], c.layout).to(pool.dtype).contiguous()
            self._store_states(pool, [self._slot(c, plan.dst[n]) for n in wn], Sw)
        self._after(inputs, pool, plan, S)
        work = ["pool gather/scatter in the twin"] if c.pool_size is not None else []
        return Outputs(o=inputs.out, state=pool, intermediate=inputs.intermediate if c.intermediate else None,
                       adapter_work=work, path=self._path(c))

    # ------------------------------------------------------------------ cores

    def _recurrent(self, q, k, v, alpha, beta, S, scale, per_step, want_inter):
        """Token loop. q,k ``[N,T,HS,K]``, v ``[N,T,HS,V]``, alpha,beta ``[N,T,HS]``, S ``[N,HS,K,V]``.

        Returns ``o [N,T,HS,V]``, final ``S``, intermediate ``[N,T,HS,K,V]`` or None.
        """
        N, T, HS, K = q.shape
        Vd = v.shape[-1]
        o = torch.empty(N, T, HS, Vd, dtype=q.dtype)
        inter = torch.empty(N, T, HS, K, Vd, dtype=q.dtype) if want_inter else None
        qsc = q * scale
        for t in range(T):
            S = S * alpha[:, t, :, None, None]
            kt = k[:, t].reshape(N * HS, 1, K)
            kS = torch.bmm(kt, S.view(N * HS, K, Vd)).view(N, HS, Vd)
            u = beta[:, t, :, None] * (v[:, t] - kS)
            S = S + k[:, t, :, :, None] * u[:, :, None, :]
            o[:, t] = torch.bmm(qsc[:, t].reshape(N * HS, 1, K), S.view(N * HS, K, Vd)).view(N, HS, Vd)
            if per_step is not None:
                S = rnd(S, per_step)
            if want_inter:
                inter[:, t] = S
        return o, S, inter

    def _inverse(self, A: torch.Tensor, store: torch.Tensor) -> torch.Tensor:
        """``(I + A)^-1`` for strictly lower ``A [.., C, C]``, held in the family's dtype."""
        dt = self._inv_dtype or store
        A = rnd(A, dt)
        eye = torch.eye(A.shape[-1], dtype=A.dtype).expand_as(A)
        inv = torch.linalg.solve_triangular(A + eye, eye, upper=False, unitriangular=True)
        return rnd(inv, dt)

    def _chunked(self, q, k, v, g, beta, S, scale, store):
        """Chunked (WY/UT) form with chunk 64, per sequence. Inputs as :meth:`_recurrent` with
        ``T`` a multiple of 64 (zero padded: g = beta = k = 0 leave the state unchanged) and log
        decays ``g``; ``store`` is the dtype of values kept between stages."""
        N, Tp, HS, K = q.shape
        Vd = v.shape[-1]
        C = CHUNK
        nc = Tp // C
        if nc == 0:
            return torch.empty(N, 0, HS, Vd, dtype=q.dtype), S

        def ch(x):  # [N, nc*C, HS, ...] -> [N, HS, nc, C, ...]
            x = x.reshape(N, nc, C, HS, *x.shape[3:])
            return x.permute(0, 3, 1, 2, *range(4, x.dim())).contiguous()

        q, k, v, g, beta = map(ch, (q, k, v, g, beta))
        Gc = g.cumsum(-1)  # chunk-local cumulative log decay
        D = Gc[..., :, None] - Gc[..., None, :]
        tri = torch.ones(C, C, dtype=torch.bool)
        strict, incl = tri.tril(-1), tri.tril()
        kk = k @ k.transpose(-1, -2)
        A = (kk * torch.exp(D.masked_fill(~strict, float("-inf")))) * beta[..., :, None]
        Ainv = self._inverse(A, store)
        kb = rnd(k * (beta * torch.exp(Gc))[..., None], store)
        vb = rnd(v * beta[..., None], store)
        w = rnd(Ainv @ kb, store)
        u = rnd(Ainv @ vb, store)
        P = rnd((q @ k.transpose(-1, -2)) * torch.exp(D.masked_fill(~incl, float("-inf"))) * scale, store)
        gq = torch.exp(Gc)[..., None] * scale
        Gend = self._chunk_end_decay(Gc)  # [N, HS, nc]
        kdec = torch.exp(Gend[..., None] - Gc)[..., None]  # decay from token j to chunk end
        o = torch.empty(N, HS, nc, C, Vd, dtype=q.dtype)
        for i in range(nc):
            Sm = rnd(S, store)  # state as MMA operand / stored per-chunk h
            vnew = u[:, :, i] - w[:, :, i] @ Sm
            o[:, :, i] = (q[:, :, i] @ Sm) * gq[:, :, i] + P[:, :, i] @ rnd(vnew, store)
            S = S * torch.exp(Gend[:, :, i])[..., None, None] + \
                k[:, :, i].transpose(-1, -2) @ rnd(vnew * kdec[:, :, i], store)
        o = o.permute(0, 2, 3, 1, 4).reshape(N, nc * C, HS, Vd)
        return o, S


class FLATwin(_Twin):
    """Twin of FLA 0.6.0: ``chunk_gated_delta_rule`` for prefill, ``fused_recurrent`` for
    decode/verify (module docstring). Padding policy ``skip`` on every op (the adapter gathers
    live rows only)."""

    name = "twin-fla"
    family = "twin"
    twin = "twin-fla"
    padding_policy = {"prefill": "skip", "decode": "skip", "verify": "skip"}
    _inv_dtype = None
    _per_step_state_round = False
    _bf16_output = False

    def _path(self, case: Case) -> str:
        return "prefill.chunk" if case.op == "prefill" else f"{case.op}.fused_recurrent"


class FlashInferTwin(_Twin):
    """Twin of FlashInfer 0.7.2.post1 on SM90: chunk kernel for prefill (fp16 block inverse),
    decode/MTP kernels for decode/verify (module docstring)."""

    name = "twin-flashinfer"
    family = "twin"
    twin = "twin-flashinfer"
    padding_policy = {"prefill": "skip", "decode": "skip", "verify": "caller_value"}
    _inv_dtype = torch.float16
    _per_step_state_round = True
    _bf16_output = True

    def _family_policy(self, case: Case) -> str:
        if case.op == "prefill":
            return "skip"
        sdt = self.knobs["state_dtype"] or case.state_dtype
        if sdt != "float32":
            return "null_slot"  # bf16 fast path: -1 reads/writes the null slot 0
        return "skip" if case.op == "decode" else "caller_value"

    def _path(self, case: Case) -> str:
        if case.op == "prefill":
            return "prefill.chunk"
        sdt = self.knobs["state_dtype"] or case.state_dtype
        if sdt != "float32":
            return f"{case.op}.bf16_state"
        return "decode.fp32_t1" if case.op == "decode" else "verify.mtp"
