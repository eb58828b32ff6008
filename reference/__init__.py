"""gdncheck's float64 oracle of the gated delta rule (installed as ``gdncheck_reference``).

Imports nothing from gdncheck, triton, flashinfer or fla; runs on CPU or CUDA.
"""
from .gating import (
    SM90_ALPHA_EPS,
    beta_from_logit,
    compute_gates,
    gates_in_kernel,
    l2norm,
    round_to,
    sm90_log_alpha,
    softplus,
)
from .gdn import FORMS, GDNResult, check_cu_seqlens, check_inputs, gated_delta_rule, head_dims
from .layouts import LAYOUTS, convert, from_v_last, to_v_last
from .pool import (
    OUT_CALLER,
    OUT_ORACLE,
    OUT_UNDEFINED,
    PADDING_POLICIES,
    ROW_UNDEFINED,
    ROW_UNTOUCHED,
    ROW_WRITTEN,
    ZERO_LENGTH_POLICIES,
    PoolResult,
    pooled_gated_delta_rule,
)
from .rows import (
    PagedDecodeSlots,
    PagedPrefillSlots,
    RowsResult,
    checkpoint_count,
    paged_decode,
    paged_decode_slots,
    paged_prefill,
    paged_prefill_slots,
    prefill_rows,
)

__all__ = [
    "compute_gates", "l2norm", "round_to", "softplus", "SM90_ALPHA_EPS", "beta_from_logit", "gates_in_kernel",
    "sm90_log_alpha",
    "FORMS", "GDNResult", "check_cu_seqlens", "check_inputs", "gated_delta_rule", "head_dims",
    "LAYOUTS", "convert", "from_v_last", "to_v_last",
    "OUT_CALLER", "OUT_ORACLE", "OUT_UNDEFINED", "PADDING_POLICIES", "ROW_UNDEFINED",
    "ROW_UNTOUCHED", "ROW_WRITTEN", "ZERO_LENGTH_POLICIES", "PoolResult", "pooled_gated_delta_rule",
    "PagedDecodeSlots", "PagedPrefillSlots", "RowsResult", "checkpoint_count", "paged_decode",
    "paged_decode_slots", "paged_prefill", "paged_prefill_slots", "prefill_rows",
]
