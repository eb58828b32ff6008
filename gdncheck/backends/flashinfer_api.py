"""Version-aware FlashInfer adapters for every public GDN entry point on SM90 and every argument.

Each backend names the entry point it wraps (``entry``), declares its arguments from
:mod:`gdncheck.backends.api_spec` (``arguments``: only those in the installed signature, read with
``inspect.signature``; a fake signature can be injected for tests with ``params=``), and says which
version it wraps (:meth:`version`). A case pins argument values through ``Case.call`` and the
fields that already mean them (:func:`gdncheck.api_calls.arg_values`).

Outcomes: a case whose arguments form a documented-invalid combination must raise the
documented error; the adapter then raises :class:`DocumentedRejection` (the run records it as
passing). An undocumented error is an ``error`` result; a call that runs where an error is
documented raises :class:`UndocumentedSuccess` (a finding).

- ``flashinfer-prefill-args``: ``chunk_gated_delta_rule`` with every argument.
- ``flashinfer-prefill-paged``: ``chunk_gated_delta_rule_paged`` (0.7.4).
- ``flashinfer-decode-paged``: ``gated_delta_rule_decode_paged`` (0.7.4).
- ``flashinfer-decode-vlast``: ``gated_delta_rule_decode`` (V-last state, no pool).
- ``flashinfer-cake-mtp``: ``cake_gated_delta_product_mtp`` with one Householder step (0.7.4; V = 64, HV = H).
"""
from __future__ import annotations

import re

import torch

from gdncheck.api_calls import arg_values, checkpoint_plan, page_table, prefill_gates, prefix_list
from gdncheck.backends.api_spec import ENTRY_POINTS, V074, ArgSpec, Invalid, signature_params, version_of
from gdncheck.backends.base import Capabilities, Outputs
from gdncheck.backends.flashinfer import _FlashInferBase, _fi_available
from gdncheck.data.case import Case
from gdncheck.inputs import Inputs


# Case.call keys that describe the case rather than name an argument (paged geometry, the api marker)
_META = {"api", "shared_prefix", "page_size", "prefix_lens"}


class DocumentedRejection(Exception):
    """The kernel refused a documented-invalid combination with the documented error: a pass."""


class UndocumentedSuccess(Exception):
    """The kernel ran a combination its documentation says raises: a finding."""


def _resolve(dotted: str):
    mod, _, attr = dotted.rpartition(".")
    try:
        return getattr(__import__(mod, fromlist=[attr]), attr)
    except Exception:  # noqa: BLE001 - not installed, or not in this version
        return None


class _ApiBackend(_FlashInferBase):
    """An entry point's adapter. Subclasses set ``entry`` (api_spec name), ``fn`` (dotted path) and ``caps``."""

    entry: str = ""
    fn: str = ""
    padding_policy = {}
    zero_length_policy = "untouched"
    understands_call = True

    def __init__(self, params: set[str] | None | str = "installed"):
        self._params = signature_params(_resolve(self.fn)) if params == "installed" else params

    # -- version and arguments
    @property
    def spec(self):
        return ENTRY_POINTS[self.entry]

    @property
    def arguments(self) -> dict[str, ArgSpec]:
        """Optional arguments of the installed entry point, with their legal values."""
        return self.spec.available(self._params) if self._params is not None else {}

    def version(self) -> str:
        pre = signature_params(_resolve("flashinfer.gdn_prefill.chunk_gated_delta_rule"))
        return f"{super().version()} ({version_of(pre)} API)"

    def available(self) -> str | None:
        if self._params is None:
            if _resolve("flashinfer.__name__") is None and super().version() == "not installed":
                return "flashinfer is not installed"
            return f"{self.entry} is not in the installed flashinfer ({super().version()}); new in {self.spec.since}"
        return _fi_available(self.fn.rpartition(".")[0])

    def invalid_for(self, case: Case) -> Invalid | None:
        """The documented-invalid combination ``case`` is, if any (only those of the installed version)."""
        vals = {**arg_values(self.entry, case), **case.call, "T": case.T, "V": case.V, "state_dtype": case.state_dtype}
        for inv in self.spec.invalid:
            if inv.since == V074 and version_of(self._pre_params()) != V074:
                continue
            if inv.matches(vals):
                return inv
        return None

    def _pre_params(self):
        return signature_params(_resolve("flashinfer.gdn_prefill.chunk_gated_delta_rule")) or self._params

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        known = self.arguments
        for k, v in case.call.items():
            if k in _META and k not in self.spec.arguments:
                continue
            if k not in known and k not in self.spec.arguments:
                return f"{self.name}: call.{k} is not an argument of {self.entry}"
            if k not in known:
                return f"{self.name}: {self.entry}({k}=...) is new in {self.spec.arguments[k].since}; installed {self.version()}"
            spec = known[k]
            if spec.not_sm90 and v in spec.not_sm90:
                return f"{self.name}: {k}={v!r} does not run on SM90 ({spec.not_sm90[v]})"
        return None

    def call_checked(self, case: Case, fn, *args, **kw):
        """Call the kernel; map a documented error to :class:`DocumentedRejection` and a run where an error is
        documented to :class:`UndocumentedSuccess`."""
        inv = self.invalid_for(case)
        try:
            out = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - the documented-error check decides
            if inv is not None and type(e).__name__ == inv.error and re.search(re.escape(inv.match), str(e)):
                raise DocumentedRejection(f"{inv.error}: {e}") from None
            raise
        if inv is not None:
            raise UndocumentedSuccess(f"{self.entry} ran {inv.when}, documented to raise {inv.error} ({inv.match!r})")
        return out


# ------------------------------------------------------------------------------ prefill, every argument

class FlashInferPrefillArgs(_ApiBackend):
    """``chunk_gated_delta_rule`` with the case's arguments (state and checkpoints: api_calls.expected_prefill_call)."""

    name = "flashinfer-prefill-args"
    entry = "chunk_gated_delta_rule"
    fn = "flashinfer.gdn_prefill.chunk_gated_delta_rule"
    caps = Capabilities(empty_batch=False, ops={"prefill"}, dtypes={"bfloat16", "float16"}, state_dtypes={"float32", "bfloat16", "float16"},
                        layouts={"k_last"}, K={128}, V={128}, gva=True, gqa=False, pool=True, strided_pool=False,
                        strided_gates=False, gate_sources={"precomputed", "raw"}, intermediate=False,
                        disable_state_update=False, padding={"skip", "null_slot", "caller_value"}, device="cuda")

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        if not case.call:
            return f"{self.name} runs cases that pin arguments (Case.call); flashinfer-prefill runs the others"
        if case.call.get("checkpoint_every_n_tokens", 0) and case.pool_size is not None and \
                case.call.get("checkpoint_state_indices", "absent") == "absent":
            return f"{self.name}: a separate checkpoint tensor is covered with plain states only"
        try:
            checkpoint_plan(case)
        except ValueError as e:
            return f"{self.name}: {e}"
        return None

    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.gdn_prefill import chunk_gated_delta_rule

        c, call = inputs.case, inputs.case.call
        dev = inputs.q.device
        pooled = c.pool_size is not None
        g, beta, kw = prefill_gates(inputs)
        every = int(call.get("checkpoint_every_n_tokens", 0))
        starts, ck_rows, C = checkpoint_plan(c)
        ofs = call.get("output_final_state", True)
        ostate = call.get("output_state", "same_as_initial" if pooled else "separate")
        init = inputs.state if call.get("initial_state", "present") == "present" else None
        if pooled:
            out_state = {"same_as_initial": inputs.state, "separate": inputs.state.clone(), "absent": None}[ostate]
            if ostate == "same_as_initial" and init is None:
                out_state = inputs.state
            kw.update(state_indices=inputs.read_indices)
            if inputs.write_indices is not None:
                kw.update(output_state_indices=inputs.write_indices)
        else:
            out_state = {"separate": torch.full_like(inputs.state, float("nan")), "same_as_initial": inputs.state,
                         "absent": None}[ostate]
        ck = None
        if every:
            kw.update(checkpoint_every_n_tokens=every,
                      checkpoint_cu_starts=torch.tensor(starts, dtype=torch.int32, device=dev))
            if ck_rows is not None:
                ck = out_state if out_state is not None else inputs.state
                kw.update(checkpoint_state_indices=torch.tensor(ck_rows, dtype=torch.int32, device=dev))
            else:
                ck = torch.full((C, *inputs.state.shape[1:]), float("nan"), dtype=inputs.state.dtype, device=dev)
            kw.update(state_checkpoints=ck)
            if call.get("prefix_lens", "absent") != "absent":
                kw.update(prefix_lens=torch.tensor(prefix_list(c), dtype=torch.int32, device=dev))
        elif call.get("checkpoint_state_indices", "absent") != "absent" or call.get("prefix_lens", "absent") != "absent":
            # documented-invalid without checkpoints: pass them so the kernel's check is exercised
            for k in ("checkpoint_state_indices", "prefix_lens"):
                if call.get(k, "absent") != "absent":
                    kw[k] = torch.zeros(c.N, dtype=torch.int32, device=dev)
        for k in ("use_cp", "backend"):
            if k in call:
                kw[k] = call[k]
        if call.get("cu_seqlens_cpu", "absent") == "present":
            kw.update(cu_seqlens_cpu=inputs.cu_seqlens.cpu())
        if call.get("max_seqlen", "absent") == "exact":
            kw.update(max_seqlen=max(c.seqlens))
        elif call.get("max_seqlen", "absent") == "too_small":  # below ceil(T / N): documented ValueError
            kw.update(max_seqlen=max(1, -(-c.T // c.N) - 1))
        res = self.call_checked(c, chunk_gated_delta_rule, q=inputs.q[0], k=inputs.k[0], v=inputs.v[0], g=g, beta=beta,
                                scale=c.scale, initial_state=init, output_final_state=ofs, cu_seqlens=inputs.cu_seqlens,
                                use_qk_l2norm_in_kernel=c.l2norm, output=inputs.out[0], output_state=out_state, **kw)
        work = ["gate inputs built by gdncheck.api_calls.prefill_gates (linear alpha = exp(g) in fp32 unless "
                "gate_domain / use_gate_in_kernel / beta_is_logit are set)"]
        if pooled:
            state = out_state if out_state is not None else inputs.state
        else:
            state = out_state if out_state is not None else (res[1] if isinstance(res, tuple) else None)
            if every and ck_rows is None and C and torch.isnan(ck.float()).flatten(1).all(1).any():
                # a separate checkpoint tensor is judged for presence only (the judge compares the
                # state tensor): every one of its C rows is a checkpoint the kernel must write
                left = torch.isnan(ck.float()).flatten(1).all(1).nonzero().flatten().tolist()
                raise RuntimeError(f"checkpoints {left[:8]} of {C} left unwritten (NaN poison)")
        return Outputs(o=inputs.out, state=state, adapter_work=work,
                       path=f"prefill.args{'.pool' if pooled else ''}")


# ------------------------------------------------------------------------------ paged

def _paged_supports(self: "_ApiBackend", case: Case) -> str | None:
    why = _ApiBackend.supports(self, case)
    return why or FlashInferPrefillPaged._check(self, case)


class FlashInferPrefillPaged(_ApiBackend):
    """``chunk_gated_delta_rule_paged`` over the case pool with the page table of :func:`page_table`."""

    name = "flashinfer-prefill-paged"
    entry = "chunk_gated_delta_rule_paged"
    fn = "flashinfer.gdn_paged.chunk_gated_delta_rule_paged"
    caps = FlashInferPrefillArgs.caps.model_copy(update={"gate_sources": {"precomputed", "raw"}})

    def supports(self, case: Case) -> str | None:
        return _paged_supports(self, case)

    def _check(self, case: Case) -> str | None:
        if "page_size" not in case.call or case.pool_size is None:
            return f"{self.name}: needs call.page_size and the derived pool rows (api_calls.paged_case_fields)"
        from gdncheck.api_calls import paged_case_fields
        if int(case.call["page_size"]) % 64:
            return None  # documented ValueError: the kernel's check runs
        try:
            want = paged_case_fields(case.op, case.seqlens, case.call)
        except ValueError as e:
            return f"{self.name}: {e}"
        if want["read_indices"] != case.read_indices or want["write_indices"] != case.write_indices \
                or want["pool_size"] > case.pool_size:
            return f"{self.name}: read/write indices must be the rows FlashInfer derives ({want})"
        return None

    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.gdn_paged import chunk_gated_delta_rule_paged, gdn_paged_prefill_slots

        c, dev = inputs.case, inputs.q.device
        pt = page_table(c)
        i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
        g, beta, kw = prefill_gates(inputs)
        tables = dict(page_indices=i32(pt.page_indices), page_indptr=i32(pt.page_indptr), last_page_len=i32(pt.last_page_len))
        if c.call.get("slots", "absent") == "precomputed":
            kw.update(slots=gdn_paged_prefill_slots(inputs.cu_seqlens, page_size=pt.page_size, **tables))
        self.call_checked(c, chunk_gated_delta_rule_paged, inputs.q[0], inputs.k[0], inputs.v[0], g, beta, c.scale,
                          cu_seqlens=inputs.cu_seqlens, state_pool=inputs.state, page_size=pt.page_size,
                          use_qk_l2norm_in_kernel=c.l2norm, output=inputs.out[0], **tables, **kw)
        return Outputs(o=inputs.out, state=inputs.state, path="prefill.paged",
                       adapter_work=["page table built by gdncheck.api_calls.page_table"])


class FlashInferDecodePaged(_ApiBackend):
    """``gated_delta_rule_decode_paged`` (T = 1) over the case pool with the page table of :func:`page_table`."""

    name = "flashinfer-decode-paged"
    entry = "gated_delta_rule_decode_paged"
    fn = "flashinfer.gdn_paged.gated_delta_rule_decode_paged"
    caps = Capabilities(ops={"decode"}, dtypes={"bfloat16", "float16"}, state_dtypes={"float32", "bfloat16"},
                        layouts={"k_last"}, gva=True, gqa=False, varlen=False, pool=True, strided_pool=False,
                        strided_gates=True, gate_sources={"raw"}, intermediate=False, disable_state_update=False,
                        padding={"skip"}, device="cuda")

    def supports(self, case: Case) -> str | None:
        return _paged_supports(self, case)

    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.gdn_paged import gated_delta_rule_decode_paged, gdn_paged_decode_slots

        c, dev = inputs.case, inputs.q.device
        pt = page_table(c)
        i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
        tables = dict(page_indices=i32(pt.page_indices), page_indptr=i32(pt.page_indptr), last_page_len=i32(pt.last_page_len))
        kw = {}
        if c.call.get("slots", "absent") == "precomputed":
            kw.update(slots=gdn_paged_decode_slots(**tables))
        if "backend" in c.call:
            kw.update(backend=c.call["backend"])
        o = self.call_checked(c, gated_delta_rule_decode_paged, inputs.q, inputs.k, inputs.v, inputs.A_log, inputs.a,
                              inputs.dt_bias, inputs.b, c.scale, inputs.out, c.l2norm, state_pool=inputs.state,
                              **tables, **kw)
        work = []
        self.into_out(o, inputs, work)
        return Outputs(o=inputs.out, state=inputs.state, path="decode.paged", adapter_work=work)


# ------------------------------------------------------------------------------ V-last decode

class FlashInferDecodeVLast(_ApiBackend):
    """``gated_delta_rule_decode``: T = 1, fp32 V-last state ``[B, HV, K, V]`` updated in place, no pool."""

    name = "flashinfer-decode-vlast"
    entry = "gated_delta_rule_decode"
    fn = "flashinfer.gdn_decode.gated_delta_rule_decode"
    zero_length_policy = "passthrough"
    caps = Capabilities(ops={"decode"}, dtypes={"bfloat16", "float16"}, state_dtypes={"float32"}, layouts={"v_last"},
                        gva=True, gqa=False, varlen=False, pool=False, strided_pool=False, strided_gates=True,
                        gate_sources={"raw"}, intermediate=False, disable_state_update=False, padding=set(),
                        device="cuda")

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        if case.K < 128 or case.V < 128 or case.V % 32:
            return f"{self.name}: K, V >= 128 and V % 32 == 0"
        return None

    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.gdn_decode import gated_delta_rule_decode

        c = inputs.case
        kw = {"backend": c.call["backend"]} if "backend" in c.call else {}
        o, _ = self.call_checked(c, gated_delta_rule_decode, inputs.q, inputs.k, inputs.v, inputs.state, inputs.A_log,
                                 inputs.a, inputs.dt_bias, inputs.b, c.scale, inputs.out, c.l2norm, **kw)
        work = []
        self.into_out(o, inputs, work)
        return Outputs(o=inputs.out, state=inputs.state, path="decode.vlast", adapter_work=work)


# ------------------------------------------------------------------------------ cake MTP

class FlashInferCakeMTP(_ApiBackend):
    """``cake_gated_delta_product_mtp`` with one Householder step (GDN MTP): fp32 pool ``[P, HV, 64, 128]``,
    V = 64, HV = H, T <= 16; negative read index: row skipped, output keeps the caller's value."""

    name = "flashinfer-cake-mtp"
    entry = "cake_gated_delta_product_mtp"
    fn = "flashinfer.cake_gdp.cake_gated_delta_product_mtp"
    padding_policy = {"decode": "caller_value", "verify": "caller_value"}
    zero_length_policy = "passthrough"
    caps = Capabilities(ops={"decode", "verify"}, dtypes={"bfloat16", "float16"}, state_dtypes={"float32"},
                        layouts={"k_last"}, K={128}, V={64}, gva=False, gqa=False, varlen=False, pool=True,
                        strided_pool=False, strided_gates=False, gate_sources={"raw"}, l2norm={True},
                        intermediate=False, disable_state_update=True, padding={"caller_value"}, device="cuda")

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        if case.H != case.HV:
            return f"{self.name}: HV = H only (no GVA)"
        if case.pool_size is None:
            return f"{self.name}: needs a pool"
        return None

    def run(self, inputs: Inputs) -> Outputs:
        from flashinfer.cake_gdp import cake_gated_delta_product_mtp

        c = inputs.case
        if c.call.get("ssm_state_indices", "absent") == "present":
            return self._run_ssm(inputs)
        k = inputs.k.unsqueeze(2)  # [B, T, 1, H, K]: one Householder step
        v = inputs.v.unsqueeze(2)
        b = inputs.b.unsqueeze(2).contiguous()
        o, _ = self.call_checked(c, cake_gated_delta_product_mtp, inputs.q, k, v, inputs.state, inputs.read_indices,
                                 inputs.A_log, inputs.a.contiguous(), inputs.dt_bias, b, scale=c.scale,
                                 output=inputs.out, disable_state_update=c.disable_state_update,
                                 use_qk_l2norm=c.l2norm, output_state_indices=inputs.write_indices)
        work = ["k, v, b given a Householder axis of 1 (views)"]
        self.into_out(o, inputs, work)
        return Outputs(o=inputs.out, state=inputs.state, path="cake_mtp.nh1", adapter_work=work)

    def _run_ssm(self, inputs: Inputs) -> Outputs:
        """``ssm_state_indices [B, T]``: each token's state to a scratch slot of an extended pool, the last
        token of a live row to its write slot (so the pool ends as the oracle expects; the end-of-row
        write-back is skipped when the table is given). Intermediate states are read back from the
        scratch slots only to check they were written (the case has no intermediate buffer)."""
        from flashinfer.cake_gdp import cake_gated_delta_product_mtp

        c = inputs.case
        B, T = c.B, c.T
        pool = inputs.state
        P = pool.shape[0]
        ext = torch.empty((P + B * T, *pool.shape[1:]), dtype=pool.dtype, device=pool.device)
        ext[:P].copy_(pool)
        ext[P:].fill_(float("nan"))
        ssm = (P + torch.arange(B * T, dtype=torch.int32, device=pool.device)).view(B, T)
        reads = c.read_indices
        writes = c.write_indices or reads
        for n in range(B):
            if reads[n] >= 0 and writes[n] >= 0:
                ssm[n, T - 1] = writes[n]
        self.call_checked(c, cake_gated_delta_product_mtp, inputs.q, inputs.k.unsqueeze(2), inputs.v.unsqueeze(2), ext,
                          inputs.read_indices, inputs.A_log, inputs.a.contiguous(), inputs.dt_bias,
                          inputs.b.unsqueeze(2).contiguous(), scale=c.scale, output=inputs.out,
                          ssm_state_indices=ssm, disable_state_update=c.disable_state_update, use_qk_l2norm=c.l2norm,
                          output_state_indices=inputs.write_indices)
        pool.copy_(ext[:P])
        live = [n for n in range(B) if reads[n] >= 0]
        left = [n for n in live if T > 1 and torch.isnan(ext[P + n * T: P + n * T + T - 1]).any()]
        if left:
            raise RuntimeError(f"ssm_state_indices: per-token states of rows {left} left unwritten")
        return Outputs(o=inputs.out, state=pool, path="cake_mtp.nh1.ssm",
                       adapter_work=[f"pool copied into an extended pool with B*T = {B * T} scratch slots for "
                                     "ssm_state_indices, rows [0, P) copied back"])
