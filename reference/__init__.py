"""gdncheck's float64 oracle of the gated delta rule (installed as ``gdncheck_reference``).

Imports nothing from gdncheck, triton, flashinfer or fla; runs on CPU or CUDA.
"""
from .gating import compute_gates, l2norm, round_to, softplus
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

__all__ = [
    "compute_gates", "l2norm", "round_to", "softplus",
    "FORMS", "GDNResult", "check_cu_seqlens", "check_inputs", "gated_delta_rule", "head_dims",
    "LAYOUTS", "convert", "from_v_last", "to_v_last",
    "OUT_CALLER", "OUT_ORACLE", "OUT_UNDEFINED", "PADDING_POLICIES", "ROW_UNDEFINED",
    "ROW_UNTOUCHED", "ROW_WRITTEN", "ZERO_LENGTH_POLICIES", "PoolResult", "pooled_gated_delta_rule",
]
