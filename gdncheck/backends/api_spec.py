"""FlashInfer's public GDN entry points as data: arguments, legal values, documented outcomes and errors.

Read from the source of flashinfer-python 0.7.2.post1 and 0.7.4 (docstrings and the checks that
raise). Backends declare the :class:`ArgSpec` of every optional argument of the entry point they
wrap; ``python -m gdncheck.api_coverage --spec`` renders this module as ``reports/flashinfer/api.md``; the ``api``
suite and the strategies draw argument values from it; :func:`coverage` tables which case covers
which value.

The installed version is read from the entry point's signature (:func:`signature_params`), so an
argument new in 0.7.4 is "unsupported on this version" on 0.7.2.post1 and tests can pass a fake
signature on a machine without FlashInfer.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

V072 = "0.7.2.post1"
V074 = "0.7.4"
VERSIONS = (V072, V074)


@dataclass(frozen=True)
class ArgSpec:
    """One optional argument: its legal values as a case expresses them (``Case.call[name]``).

    ``values``: the legal values (booleans, strings, ints, or symbolic tensor states such as
    ``"absent"``, ``"present"``, ``"minus_one"``); ``default`` the value a call without the
    argument has; ``since`` the first version with the argument; ``doc`` the documented outcome;
    ``not_sm90``: values that exist but do not run on SM90, with why; ``case_key`` False for
    arguments no case sets (covered by the adapter's fixed choice, said in ``doc``).
    """

    values: tuple
    default: Any
    doc: str
    since: str = V072
    not_sm90: dict = field(default_factory=dict)
    case_key: bool = True
    keyword: bool = True  # False: a property of the call derived from other arguments (not a parameter)


@dataclass(frozen=True)
class Invalid:
    """A documented-invalid combination: ``when`` (argument -> value) raises ``error`` matching ``match``."""

    def matches(self, vals: dict) -> bool:
        return all(vals.get(k, "absent") in (v if isinstance(v, tuple) else (v,)) for k, v in self.when.items())

    when: dict  # argument -> value, or a tuple of values (any of them)
    error: str
    match: str
    since: str = V072
    check: str = ""


@dataclass(frozen=True)
class EntryPoint:
    """One public function. ``sm90``: "yes" or why not; ``backend``: the gdncheck backend name(s)."""

    name: str
    module: str
    since: str
    sm90: str
    backend: str
    layout: str
    shapes: str
    arguments: dict[str, ArgSpec]
    invalid: tuple[Invalid, ...] = ()
    contracts: tuple[str, ...] = ()

    def available(self, params: set[str] | None) -> dict[str, ArgSpec]:
        """Arguments present in an installed signature (``params``; None: every argument)."""
        if params is None:
            return dict(self.arguments)
        return {k: a for k, a in self.arguments.items()
                if k in params or not a.keyword or not a.case_key and a.since == V072}


def signature_params(fn: Callable | None) -> set[str] | None:
    """Parameter names of an installed function (None when it is not installed)."""
    if fn is None:
        return None
    return set(inspect.signature(fn).parameters)


def version_of(params: set[str] | None, probe: str = "gate_domain") -> str:
    """Which documented version a ``chunk_gated_delta_rule`` signature is: 0.7.4 has ``gate_domain``."""
    if params is None:
        return "not installed"
    return V074 if probe in params else V072


# --------------------------------------------------------------------------- prefill

_IDX = "state_indices"
PREFILL = EntryPoint(
    name="chunk_gated_delta_rule", module="flashinfer.gdn_prefill", since=V072, sm90="yes",
    backend="flashinfer-prefill, -prefill-cp, -prefill-chunk (fixed arguments); flashinfer-prefill-args (every argument)",
    layout="k_last", shapes="q [T, Hq, 128], k [T, Hk, 128], v [T, Hv, 128] fp16/bf16; g, beta [T, max(Hq, Hv)] fp32; "
    "state [N or pool, HS, 128, 128] fp32/bf16/fp16/fp8; cu_seqlens [N + 1] int32/int64 (required)",
    arguments={
        "initial_state": ArgSpec(("absent", "present"), "absent",
                                 "absent: zero state; present: [N, ...] rows in order, or a pool with state_indices"),
        "output_final_state": ArgSpec((True, False), False,
                                      "True: returns (o, final_state); False: returns o only. SM90 stores the final "
                                      "state whenever it has a tensor for it (caller's output_state, else scratch)"),
        "output_state": ArgSpec(("absent", "separate", "same_as_initial"), "absent",
                                "pre-allocated final-state tensor; required with state_indices and "
                                "output_final_state=True; same_as_initial = in place"),
        "state_indices": ArgSpec(("absent", "unique", "repeated", "minus_one"), "absent",
                                 "pool rows read (and written without output_state_indices); unique required "
                                 "without output_state_indices (unchecked); repeated / -1 legal only with "
                                 "output_state_indices (-1: zero state), since 0.7.4"),
        "output_state_indices": ArgSpec(("absent", "present", "minus_one"), "absent",
                                        "separate write rows: -1 skips the write; a zero-length sequence writes "
                                        "nothing (SM90; SM100 copies h0)", since=V074),
        "checkpoint_every_n_tokens": ArgSpec((0, 64, 128), 0,
                                             "store the state every n tokens (a multiple of 64) into state_checkpoints"),
        "checkpoint_state_indices": ArgSpec(("absent", "present", "minus_one"), "absent",
                                            "checkpoint j of sequence i goes to pool row "
                                            "checkpoint_state_indices[checkpoint_cu_starts[i] + j]; -1 skips",
                                            since=V074),
        "prefix_lens": ArgSpec(("absent", "aligned", "unaligned"), "absent",
                               "checkpoints at absolute positions (prefix + n) % every == 0; unaligned prefixes "
                               "are padded with identity rows (gate 1, beta 0)", since=V074),
        "use_cp": ArgSpec(("auto", True, False), "auto",
                          "auto: CP when N * HS * 2 < SM count; True: 4-launch CP kernel (rejects slot "
                          "arguments); False: chunk kernel"),
        "backend": ArgSpec(("auto", "flashinfer"), "auto",
                           "auto = flashinfer on SM90 (cuDNN auto-selection is SM100 only)",
                           not_sm90={"cudnn": "cuDNN fused engine is SM100", "cake_gdn": "Cake kernels are SM100+",
                                     "sm120_cute": "RTX 6000D SM120 only"}),
        "gate_domain": ArgSpec(("linear", "log"), "linear",
                               "g is linear alpha or natural-log alpha (exp in fp32 before the kernel); the SM90 "
                               "kernel takes log2(alpha + 1e-10): decays below ~e^-23 are floored", since=V074),
        "use_gate_in_kernel": ArgSpec((False, True), False,
                                      "g is the raw a; log alpha = -exp(A_log) * softplus(a + dt_bias) in fp32 "
                                      "(PyTorch on SM90); needs A_log, dt_bias [HS]", since=V074),
        "beta_is_logit": ArgSpec((False, True), False,
                                 "beta = sigmoid(b) in fp32, rounded to b's dtype (fp32 or q's dtype)", since=V074),
        "cu_seqlens_cpu": ArgSpec(("absent", "present"), "absent",
                                  "host copy of cu_seqlens; on SM90 only validated/used by routes that are not SM90 "
                                  "(Cake, SM8x): no effect on the outcome", since=V074),
        "max_seqlen": ArgSpec(("absent", "exact"), "absent",
                              "upper bound on the longest sequence for CP grids; must lie in "
                              "[ceil(T / N), T]"),
        "use_qk_l2norm_in_kernel": ArgSpec((True, False), False, "L2-normalise q, k (eps 1e-6) in fp32, rounded "
                                           "back to the input dtype, before the kernel"),
        "scale": ArgSpec(("default", "custom"), "default", "None or 0.0: 1/sqrt(128)", case_key=False),
    },
    invalid=(
        Invalid({"output_state_indices": ("present", "minus_one"), "state_indices": "absent"}, "ValueError",
                "output_state_indices requires state_indices", V074, "_validate_slot_args"),
        Invalid({"output_state_indices": ("present", "minus_one"), "output_final_state": False}, "ValueError",
                "requires an explicit output_state pool and output_final_state=True", V074, "_validate_slot_args"),
        Invalid({"output_state_indices": ("present", "minus_one"), "output_state": "absent"}, "ValueError",
                "requires an explicit output_state pool and output_final_state=True", V074, "_validate_slot_args"),
        Invalid({"prefix_lens": ("aligned", "unaligned"), "use_cp": True}, "ValueError",
                "not supported with context parallelism", V074, "_validate_slot_args"),
        Invalid({"checkpoint_state_indices": ("present", "minus_one"), "use_cp": True}, "ValueError",
                "not supported with context parallelism", V074, "_validate_slot_args"),
        Invalid({"output_state_indices": ("present", "minus_one"), "use_cp": True}, "ValueError",
                "not supported with context parallelism", V074, "_validate_slot_args"),
        Invalid({"prefix_lens": ("aligned", "unaligned"), "checkpoint_every_n_tokens": 0}, "ValueError",
                "prefix_lens requires checkpoint_every_n_tokens > 0", V074, "_validate_slot_args"),
        Invalid({"checkpoint_state_indices": ("present", "minus_one"), "checkpoint_every_n_tokens": 0}, "ValueError",
                "checkpoint_state_indices requires checkpoint_every_n_tokens > 0", V074, "_validate_slot_args"),
        Invalid({"checkpoint_every_n_tokens": 96}, "ValueError", "multiple of the chunk size", V072),
        Invalid({"state_indices": "unique", "output_state_indices": "absent", "output_state": "absent",
                 "output_final_state": True}, "ValueError",
                "requires an explicit output_state pool", V072, "state_indices branch"),
        Invalid({"use_gate_in_kernel": True, "A_log": "absent"}, "ValueError",
                "use_gate_in_kernel requires g, A_log and dt_bias", V074, "gates.validate_gate_inputs"),
        Invalid({"use_gate_in_kernel": False, "A_log": "present"}, "ValueError",
                "A_log and dt_bias require use_gate_in_kernel=True", V074, "gates.validate_gate_inputs"),
        Invalid({"gate_domain": "exp"}, "ValueError", "gate_domain must be 'linear' or 'log'", V074),
        Invalid({"use_cp": "yes"}, "ValueError", 'use_cp must be "auto", True, or False', V072),
        Invalid({"backend": "triton"}, "ValueError", "unsupported GDN backend", V072),
        Invalid({"max_seqlen": "too_small"}, "ValueError", "max_seqlen cannot be smaller", V072),
    ),
    contracts=(
        "zero-length sequences: SM90 writes nothing to their output-state row (0.7.4 docstring; finding 4/8 "
        "measured otherwise at H = 2, HV = 4/6 on 0.7.2.post1 and 0.7.4)",
        "state_indices + output_final_state=False + output_state absent: 0.7.2.post1 SM90 allocates a [N, ...] "
        "scratch and stores at pool-slot rows (finding 5, out of bounds); 0.7.4 allocates a pool-shaped scratch",
        "negative state_indices without output_state_indices: no padding meaning (row numbers)",
        "checkpoint_cu_starts: [N + 1] (or [N] with checkpoint_state_indices); non-contiguous checkpoint "
        "tensors raise RuntimeError since 0.7.4 (0.7.2 wrote a copy and lost the results)",
    ),
)

PREFILL_PAGED = EntryPoint(
    name="chunk_gated_delta_rule_paged", module="flashinfer.gdn_paged", since=V074, sm90="yes",
    backend="flashinfer-prefill-paged", layout="k_last",
    shapes="q, k, v packed [T, H*, 128]; state_pool [num_pages, HS, 128, 128]; page_indices [num_indices], "
    "page_indptr [N + 1], last_page_len [N] int32/int64 contiguous",
    arguments={
        "page_size": ArgSpec((64, 128), None, "tokens per page, a positive multiple of 64 (Python int)"),
        "prefix_lens": ArgSpec(("empty", "aligned", "unaligned", "page_interior"), "empty",
                               "tokens before the new ones, from the page table: the page holding the last "
                               "prefix token is read (zero state for an empty prefix)", keyword=False),
        "zero_length": ArgSpec((False, True), False, "a sequence with no new tokens leaves the pool unchanged",
                               keyword=False),
        "gate_domain": ArgSpec(("linear", "log"), "linear", "as chunk_gated_delta_rule"),
        "use_gate_in_kernel": ArgSpec((False, True), False, "as chunk_gated_delta_rule"),
        "beta_is_logit": ArgSpec((False, True), False, "as chunk_gated_delta_rule"),
        "use_qk_l2norm_in_kernel": ArgSpec((True, False), False, "as chunk_gated_delta_rule"),
        "slots": ArgSpec(("absent", "precomputed"), "absent",
                         "rows from gdn_paged_prefill_slots (not checked against the page table)"),
    },
    invalid=(
        Invalid({"page_size": 96}, "ValueError", "page_size must be a positive multiple of 64", V074, "_check_page_size"),
        Invalid({"page_indptr": "wrong_length"}, "ValueError", "page_indptr must be", V074, "_check_page_table"),
        Invalid({"page_indices": "float"}, "ValueError", "page_indices must be int32 or int64", V074, "_check_page_table"),
    ),
    contracts=(
        "reads the page holding the last prefix token; zero state for an empty prefix",
        "writes a checkpoint to every page whose boundary the new tokens cross; the final state to the last page "
        "(-1 when the sequence ends on a boundary: the checkpoint is the final state)",
        "full prefix pages are only read; a prefix ending inside a page continues it in place",
        "zero-length sequences leave the pool unchanged; the page table is not validated on the device",
        "internally one chunk_gated_delta_rule call with output_state_indices, checkpoint_state_indices=page_indices, "
        "prefix_lens, use_cp=False",
    ),
)

# --------------------------------------------------------------------------- decode

_DEC_COMMON = {
    "use_qk_l2norm": ArgSpec((True, False), True, "L2-normalise q, k in the kernel (eps 1e-6)"),
    "output": ArgSpec(("absent", "present"), "absent", "caller buffer [B, T, HV, V]; else allocated (bf16 inside)",
                      case_key=False),
    "scale": ArgSpec(("default", "custom"), "default", "None: 1/sqrt(K)", case_key=False),
}

DECODE = EntryPoint(
    name="gated_delta_rule_decode_pretranspose", module="flashinfer.gdn_decode", since=V072, sm90="yes",
    backend="flashinfer-decode", layout="k_last",
    shapes="q, k [B, T, H, K], v [B, T, HV, V], a, b [B, T, HV], A_log [HV] fp32, dt_bias [HV] bf16/fp32; "
    "state [B, HV, V, K] or pool initial_state [P, HV, V, K] + initial_state_indices [B]",
    arguments={
        **_DEC_COMMON,
        "initial_state": ArgSpec(("absent", "pool"), "absent", "pool instead of state; needs initial_state_indices"),
        "initial_state_indices": ArgSpec(("absent", "present", "minus_one"), "absent",
                                         "-1: fp32 T=1 skips (output 0); bf16 reads/writes slot 0 (null slot); "
                                         "fp32 T>1 (MTP) keeps the caller's output"),
        "output_state_indices": ArgSpec(("absent", "present", "minus_one"), "absent",
                                        "separate write rows; -1 on fp32 T=1 redirects to slot 0 (finding 3)"),
        "intermediate_states_buffer": ArgSpec(("absent", "present"), "absent",
                                              "[B, >=T, HV, V, K] per-token states, T > 1 only"),
        "disable_state_update": ArgSpec((False, True), False, "T > 1 only: the pool is not written"),
        "backend": ArgSpec(("auto", "flashinfer"), "auto", "auto = flashinfer on SM90",
                           not_sm90={"cake_gdn": "SM100+ (source-only)", "rubin": "Rubin GPUs only"}),
    },
    invalid=(
        Invalid({"T": 1, "intermediate_states_buffer": "present"}, "ValueError",
                "intermediate_states_buffer is supported only for T > 1", V072),
        Invalid({"T": 1, "disable_state_update": True}, "ValueError", "disable_state_update is supported only for T > 1", V072),
        Invalid({"backend": "triton"}, "ValueError", "unsupported GDN backend", V072),
        Invalid({"backend": "rubin"}, "ValueError", "Rubin", V072),
        Invalid({"initial_state": "pool", "initial_state_indices": "absent"}, "AssertionError", "", V072),
    ),
    contracts=("paths: fp32 T=1 (legacy), bf16 state K = V = 128 any T (ilp4 / wide_vec at B*HV >= 128), "
               "fp32 T>1 pool -> gated_delta_rule_mtp", "checks are mostly assert (vanish under python -O)"),
)

DECODE_VLAST = EntryPoint(
    name="gated_delta_rule_decode", module="flashinfer.gdn_decode", since=V072, sm90="yes",
    backend="flashinfer-decode-vlast", layout="v_last",
    shapes="q, k [B, 1, H, K], v [B, 1, HV, V], state [B, HV, K, V] fp32 (no pool), K, V >= 128, V % 32 == 0",
    arguments={**_DEC_COMMON,
               "backend": ArgSpec(("auto", "flashinfer"), "auto", "auto tries Cake (SM100+), falls back on SM90",
                                  not_sm90={"cake_gdn": "SM100+ (source-only)"})},
    invalid=(Invalid({"T": 2}, "AssertionError", "Decode only supports T=1", V072),
             Invalid({"state_dtype": "bfloat16"}, "AssertionError", "state must be float32", V072),
             Invalid({"backend": "rubin"}, "ValueError", "unsupported GDN backend", V072)),
    contracts=("state updated in place (copied back when non-contiguous)",),
)

DECODE_PAGED = EntryPoint(
    name="gated_delta_rule_decode_paged", module="flashinfer.gdn_paged", since=V074, sm90="yes",
    backend="flashinfer-decode-paged", layout="k_last",
    shapes="q, k [B, 1, H, K], v [B, 1, HV, V]; state_pool [num_pages, HV, V, K]; CSR page table",
    arguments={**_DEC_COMMON,
               "last_page_len": ArgSpec(("one", "interior", "full"), None,
                                        "1: the token opens a new page: read the previous page (left untouched), "
                                        "write the new one; else the last page is updated in place"),
               "state_dtype": ArgSpec(("float32", "bfloat16"), "float32", "the pool dtypes of decode_pretranspose",
                                      keyword=False),
               "slots": ArgSpec(("absent", "precomputed"), "absent", "rows from gdn_paged_decode_slots"),
               "backend": DECODE.arguments["backend"]},
    invalid=(Invalid({"T": 2}, "ValueError", "decodes one token", V074),
             Invalid({"last_page_len_dtype": "int16"}, "ValueError", "must be int32 or int64", V074)),
    contracts=("every sequence needs a token before the decoded one (last_page_len == 1 needs >= 2 pages): "
               "not checked; violating it reads another sequence's page",),
)

MTP = EntryPoint(
    name="gated_delta_rule_mtp", module="flashinfer.gdn_decode", since=V072, sm90="yes",
    backend="flashinfer-mtp, flashinfer-mtp-ssm", layout="k_last",
    shapes="q, k [B, T, H, K], v [B, T, HV, V]; pool initial_state [P, HV, V, K] fp32; initial_state_indices [B]",
    arguments={**_DEC_COMMON,
               "initial_state_indices": ArgSpec(("present", "minus_one"), None,
                                                "-1: read and write skipped, output keeps the caller's value"),
               "output_state_indices": ArgSpec(("absent", "present", "minus_one"), "absent", "-1 skips the write"),
               "intermediate_states_buffer": ArgSpec(("absent", "present"), "absent",
                                                     "[>=B, >=T, HV, V, K] fp32 by batch row (S > T views fixed in 0.7.4)"),
               "ssm_state_indices": ArgSpec(("absent", "present"), "absent",
                                            "[B, T] int32 pool slots per token; skips the final write-back; no "
                                            "negative-padding promise (0.7.4 docstring)"),
               "disable_state_update": ArgSpec((False, True), None, "None means True with a warning: always passed"),
               "cache_replayssm": ArgSpec((False,), False, "ReplaySSM caching is SM100/SM120 only",
                                          not_sm90={True: "raises ValueError on SM90 (SM100/SM103 or SM120)"})},
    invalid=(Invalid({"cache_replayssm": True}, "ValueError", "ReplaySSM caching requires SM100/SM103 or SM120", V072),
             Invalid({"ssm_state_indices": "present", "disable_state_update": True}, "AssertionError", "", V072),
             Invalid({"state_dtype": "bfloat16"}, "AssertionError", "float32", V072)),
    contracts=("two kernels: B*HV <= 128 and a warp-specialized one above",
               "slot >= 4096 at HV = 32 (int32 offset): crash or silent corruption on 0.7.2.post1 (findings 1, 9); "
               "correct on 0.7.4"),
)

CAKE_MTP = EntryPoint(
    name="cake_gated_delta_product_mtp", module="flashinfer.cake_gdp", since=V074, sm90="yes (sm_90a export)",
    backend="flashinfer-cake-mtp", layout="k_last",
    shapes="q [B, T, H, 128]; k [B, T, nh, H, 128]; v [B, T, nh, HV, 64] (V = 64), HV = H; b [B, T, nh, HV]; "
    "pool [P, HV, 64, 128] fp32; T <= 16; nh = 1 is GDN MTP",
    arguments={**_DEC_COMMON,
               "use_qk_l2norm": ArgSpec((True,), True, "x * rsqrt(sum(x^2) + 1e-6); sm_90a exports only this route",
                                        not_sm90={False: "no decode_nh1_raw route on sm_90a: ValueError"}),
               "initial_state_indices": ArgSpec(("present", "minus_one"), None,
                                                "negative: row skipped entirely, output keeps the caller's value"),
               "output_state_indices": ArgSpec(("absent", "present", "minus_one"), "absent", "negative skips the write-back"),
               "ssm_state_indices": ArgSpec(("absent", "present"), "absent",
                                            "[B, T] int32 per-token scatter (negative skips); end write-back skipped"),
               "disable_state_update": ArgSpec((False, True), None,
                                               "None means False here (unlike gated_delta_rule_mtp)")},
    invalid=(Invalid({"V": 128}, "ValueError", "v must be", V074),
             Invalid({"use_qk_l2norm": False}, "ValueError", "no exported Cake GDP decode program", V074),
             Invalid({"T": 17}, "ValueError", "no exported Cake GDP decode program", V074),
             Invalid({"ssm_state_indices": "present", "disable_state_update": True}, "ValueError",
                     "ssm_state_indices requires state writes", V074)),
)

SLOTS = EntryPoint(
    name="gdn_paged_prefill_slots / gdn_paged_decode_slots", module="flashinfer.gdn_paged", since=V074, sm90="yes (Triton)",
    backend="exercised through the paged backends' slots=precomputed; the rows are checked against "
    "gdncheck_reference.paged_*_slots by flashinfer-prefill-paged / -decode-paged",
    layout="-", shapes="int32 [N] rows from the CSR page table",
    arguments={}, contracts=("formulas: reference/rows.py (paged_prefill_slots, paged_decode_slots)",),
)

ENTRY_POINTS: dict[str, EntryPoint] = {e.name: e for e in (PREFILL, PREFILL_PAGED, DECODE, DECODE_VLAST,
                                                            DECODE_PAGED, MTP, CAKE_MTP, SLOTS)}

NOT_SM90: dict[str, str] = {
    "chunk_gated_delta_rule2": "GDN2 prefill: SM100 kernels only",
    "chunk_gated_delta_product (backend='cake')": "SM90 route exists (prefill of cake MTP, V = 64, HV = H); not a GDN "
    "entry point (DeltaProduct); not wrapped yet",
    "gated_delta_rule_replayssm_commit": "ReplaySSM is SM100/SM103/SM120",
    "ugpu_state_pool": "Rubin uGPU pools",
    "gdn_train, cake_gdn_train_kcp": "training, SM100+",
    "qwen_3_5_gdn_block_*": "compute capability 10.0",
    "gdn_fused_decode_step (experimental)": "SM120 persistent kernel",
    "backend='cudnn' / 'cake_gdn' / 'rubin' / 'sm120_cute'": "SM100 / SM100+ / Rubin / SM120",
}


def render_markdown() -> str:
    """The spec as Markdown: one table per entry point (argument, values, default, since, outcome)."""
    lines = ["# FlashInfer GDN entry points on SM90 (0.7.2.post1 and 0.7.4)", "",
             "Generated by `python -m gdncheck.api_coverage --spec` from `gdncheck/backends/api_spec.py` (read from the source of both "
             "wheels). `since` = first version with the argument; values in *italics* exist but do not run on SM90.", ""]
    for e in ENTRY_POINTS.values():
        lines += [f"## `{e.module}.{e.name}`" if "/" not in e.name else f"## `{e.name}`", "",
                  f"since {e.since}; SM90: {e.sm90}; layout {e.layout}; gdncheck backend: {e.backend}", "",
                  f"Shapes: {e.shapes}", ""]
        if e.arguments:
            lines += ["| argument | legal values | default | since | documented outcome |", "|---|---|---|---|---|"]
            for n, a in e.arguments.items():
                vals = ", ".join(f"`{v}`" for v in a.values)
                if a.not_sm90:
                    vals += "; " + ", ".join(f"*`{v}`* ({why})" for v, why in a.not_sm90.items())
                lines.append(f"| `{n}` | {vals} | `{a.default}` | {a.since} | {a.doc} |")
            lines.append("")
        if e.invalid:
            lines += ["Documented errors:", "", "| when | raises | message | since | check |", "|---|---|---|---|---|"]
            for i in e.invalid:
                when = ", ".join(f"`{k}={v}`" for k, v in i.when.items())
                lines.append(f"| {when} | {i.error} | {i.match or '(assert)'} | {i.since} | {i.check} |")
            lines.append("")
        if e.contracts:
            lines += ["Contracts:", ""] + [f"- {c}" for c in e.contracts] + [""]
    lines += ["## Not on SM90", "", "| entry point / value | why |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in NOT_SM90.items()]
    return "\n".join(lines) + "\n"


# Parameter names of each entry point as read from the wheels (the signatures adapters see there);
# tests and the coverage table use them in place of an installed package.
_DEC = ["q", "k", "v", "state", "A_log", "a", "dt_bias", "b", "scale", "output", "use_qk_l2norm"]
_CHUNK072 = ["q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state", "cu_seqlens",
             "use_qk_l2norm_in_kernel", "output", "output_state", "state_checkpoints", "checkpoint_cu_starts",
             "checkpoint_every_n_tokens", "use_cp", "state_indices", "_cp_chunk_len", "backend", "max_seqlen"]
_MTP = ["q", "k", "v", "initial_state", "initial_state_indices", "A_log", "a", "dt_bias", "b", "scale", "output",
        "intermediate_states_buffer", "ssm_state_indices", "disable_state_update", "use_qk_l2norm",
        "output_state_indices", "cache_replayssm", "replayssm_rawv", "replayssm_rawk", "replayssm_g", "replayssm_beta"]
SIGNATURES: dict[str, dict[str, set[str] | None]] = {
    V072: {
        "chunk_gated_delta_rule": set(_CHUNK072),
        "chunk_gated_delta_rule_paged": None,
        "gated_delta_rule_decode_paged": None,
        "gated_delta_rule_decode": set(_DEC + ["backend"]),
        "gated_delta_rule_decode_pretranspose": set(_DEC + ["initial_state", "initial_state_indices",
                                                            "output_state_indices", "intermediate_states_buffer",
                                                            "disable_state_update", "backend"]),
        "gated_delta_rule_mtp": set(_MTP),
        "cake_gated_delta_product_mtp": None,
    },
    V074: {
        "chunk_gated_delta_rule": set(_CHUNK072 + ["gate_domain", "use_gate_in_kernel", "A_log", "dt_bias",
                                                   "beta_is_logit", "cu_seqlens_cpu", "output_state_indices",
                                                   "checkpoint_state_indices", "prefix_lens"]),
        "chunk_gated_delta_rule_paged": {"q", "k", "v", "g", "beta", "scale", "cu_seqlens", "state_pool",
                                         "page_indices", "page_indptr", "page_size", "last_page_len",
                                         "use_qk_l2norm_in_kernel", "output", "gate_domain", "use_gate_in_kernel",
                                         "A_log", "dt_bias", "beta_is_logit", "slots"},
        "gated_delta_rule_decode_paged": set(_DEC[:3] + _DEC[4:] + ["state_pool", "page_indices", "page_indptr",
                                                                   "last_page_len", "backend", "slots"]),
        "gated_delta_rule_decode": set(_DEC + ["backend"]),
        "gated_delta_rule_decode_pretranspose": set(_DEC + ["initial_state", "initial_state_indices",
                                                            "output_state_indices", "intermediate_states_buffer",
                                                            "disable_state_update", "backend"]),
        "gated_delta_rule_mtp": set(_MTP),
        "cake_gated_delta_product_mtp": {"q", "k", "v", "initial_state", "initial_state_indices", "A_log", "a",
                                         "dt_bias", "b", "scale", "output", "ssm_state_indices",
                                         "disable_state_update", "use_qk_l2norm", "output_state_indices"},
    },
}
