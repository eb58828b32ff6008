"""Real kernels against the float64 oracle (GPU only; skipped cleanly without CUDA or the package).

Error model: the floor is the rel_l2 of the oracle's output rounded once to the output dtype,
the error no kernel with that output dtype can beat. Recurrent/decode kernels keep the state and
all arithmetic in fp32, so their error is the final rounding alone: bound 1.5 x floor (measured
1.00x on H100). Chunked kernels (FlashInfer prefill, FLA chunk) also round a handful of O(1)
intermediates to the input dtype (normalized q/k, WY blocks, per-chunk states), each adding about
one floor in quadrature: bound 4 x floor (measured 2.0-2.5x); a dropped term, transposed state or
wrong gate is an O(1) error, hundreds of floors. States and intermediate states are judged by the
same bound in units of the output-dtype floor (bf16 state: rounding to bf16 is itself one floor).
Contracts are exact: rows the call must not touch are bit-identical, no poisoned element that the
call must write survives, padded rows follow the declared policy.
"""
from __future__ import annotations

import pytest
import torch

from gdncheck.backends.fla import FLAChunk, FLARecurrent
from gdncheck.backends.flashinfer import FlashInferDecode, FlashInferMTP, FlashInferPrefill
from gdncheck.data.case import Case
from gdncheck.inputs import DTYPES, materialize
from gdncheck.oracle import expected
from gdncheck_reference import OUT_CALLER, OUT_ORACLE, ROW_UNTOUCHED, ROW_WRITTEN

pytestmark = pytest.mark.gpu

M = dict(H=16, HV=32, K=128, V=128)
RECURRENT, CHUNKED = 1.5, 4.0

CASES = [
    # (id, backend factory, bound, case fields)
    ("fi-decode-fp32-t1-pad", FlashInferDecode, RECURRENT,
     dict(op="decode", seqlens=[1] * 4, gate_source="raw", pool_size=16, read_indices=[3, -1, 7, 0])),
    ("fi-decode-bf16-t1-pad", FlashInferDecode, RECURRENT,
     dict(op="decode", seqlens=[1] * 4, state_dtype="bfloat16", gate_source="raw", pool_size=16,
          read_indices=[3, -1, 7, 5])),
    ("fi-decode-fp32-mtp-pad", FlashInferDecode, RECURRENT,
     dict(op="verify", seqlens=[4] * 3, gate_source="raw", pool_size=16, read_indices=[2, -1, 4], intermediate=True)),
    ("fi-mtp-buffer-pad", FlashInferMTP, RECURRENT,
     dict(op="verify", seqlens=[4] * 3, gate_source="raw", pool_size=16, read_indices=[4, -1, 9],
          write_indices=[5, -1, -1], intermediate=True)),
    ("fi-mtp-ssm", lambda: FlashInferMTP("ssm"), RECURRENT,
     dict(op="verify", seqlens=[3] * 2, gate_source="raw", pool_size=8, read_indices=[1, 6], intermediate=True)),
    ("fi-prefill-chunk-pool-zero-len", lambda: FlashInferPrefill(False), CHUNKED,
     dict(op="prefill", seqlens=[130, 0, 1, 64], pool_size=16, read_indices=[3, 7, 1, 12])),
    ("fi-prefill-cp-pool", lambda: FlashInferPrefill(True), CHUNKED,
     dict(op="prefill", seqlens=[200, 64], pool_size=16, read_indices=[5, 11])),
    ("fla-chunk-kl-raw-pad", FLAChunk, CHUNKED,
     dict(op="prefill", seqlens=[150, 40, 64], layout="k_last", gate_source="raw", pool_size=8, read_indices=[5, -1, 2])),
    ("fla-recurrent-vl-raw-pad", FLARecurrent, RECURRENT,
     dict(op="decode", seqlens=[1] * 4, layout="v_last", gate_source="raw", pool_size=8, read_indices=[3, -1, 6, 1])),
    ("fla-recurrent-kl-verify-bf16", FLARecurrent, RECURRENT,
     dict(op="verify", seqlens=[4] * 2, layout="k_last", gate_source="raw", state_dtype="bfloat16",
          pool_size=8, read_indices=[2, 7])),
]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    d = torch.nan_to_num(x.double() - ref, nan=float("inf"))
    return d.norm().item() / ref.norm().item()


@pytest.mark.parametrize("seed", [101, 202])
@pytest.mark.parametrize("cid,factory,bound,fields", CASES, ids=[c[0] for c in CASES])
def test_backend_matches_oracle(cid, factory, bound, fields, seed):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    be = factory()
    why = be.available()
    if why:
        pytest.skip(why)
    case = Case(**M, **fields, seed=seed)
    assert be.supports(case) is None, be.supports(case)
    inp = materialize(case, "cuda")
    before = inp.clone()
    exp = expected(before, be.policy(case), be.zero_length_policy, device="cuda")
    out = be.run(inp)
    torch.cuda.synchronize()
    dt = DTYPES[case.dtype]

    m = exp.o_class == OUT_ORACLE
    ref, got = exp.o[m], out.o[m]
    floor = _rel(ref.to(dt), ref)
    assert not torch.isnan(got).any(), f"{cid}: {int(torch.isnan(got).sum())} output elements left unwritten"
    assert _rel(got, ref) <= bound * floor, f"{cid} [{out.path}]: o rel_l2 {_rel(got, ref):.3e} > {bound} x floor {floor:.3e}"
    cm = exp.o_class == OUT_CALLER
    if cm.any():
        a, b = out.o[cm], before.out[cm]
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0), b.nan_to_num(0)), \
            f"{cid}: padded rows must keep the caller's output"

    w, u = exp.row_class == ROW_WRITTEN, exp.row_class == ROW_UNTOUCHED
    for i in torch.nonzero(u).flatten().tolist():
        assert torch.equal(out.state[i], before.state[i]), f"{cid}: untouched pool row {i} changed"
    if w.any():
        sref = exp.pool[w]
        assert not torch.isnan(out.state[w]).any(), f"{cid}: written pool rows hold poison"
        assert _rel(out.state[w], sref) <= bound * _rel(sref.to(dt), sref), f"{cid}: state rel_l2 {_rel(out.state[w], sref):.3e}"
    if case.intermediate:
        live = [n for n in range(case.B) if n not in case.padded_rows]
        gi, ei = out.intermediate[live], exp.intermediate[live]
        assert not torch.isnan(gi).any(), f"{cid}: intermediate states left unwritten"
        assert _rel(gi, ei) <= bound * _rel(ei.to(dt), ei), f"{cid}: intermediate rel_l2 {_rel(gi, ei):.3e}"


@pytest.mark.parametrize("twin", ["twin-fla", "twin-flashinfer"])
@pytest.mark.parametrize("fields", [
    dict(op="prefill", seqlens=[150, 0, 40], pool_size=8, read_indices=[5, -1, 2]),
    dict(op="verify", seqlens=[4] * 3, gate_source="raw", pool_size=8, read_indices=[2, -1, 6], intermediate=True),
    dict(op="decode", seqlens=[1] * 4, state_dtype="bfloat16", pool_size=8, read_indices=[3, -1, 6, 1]),
], ids=["prefill", "verify", "decode-bf16"])
def test_twin_on_cuda_equals_twin_on_cpu(twin, fields):
    """The twins run beside the kernels on the GPU: the same arithmetic as on the CPU (CI), up to
    the order of fp32 sums.

    Error model: each step sums K products in fp32, and the state carries T steps, so the two
    devices' fp32 results differ by about ``sqrt(T * K)`` fp32 roundings; bound ``d32 = 4 *
    sqrt(T * K) * 2**-24`` in rel_l2. A tensor stored in fp32 must stay within ``d32``. One stored
    in bf16/fp16 is that fp32 value rounded once: an element moves by one rounding step (at most
    ``eps`` of its value) when its fp32 value lies within ``d32`` of a rounding midpoint, which a
    fraction of at most ``4 * d32 / eps`` of the elements does; bound ``d32 + sqrt(4 * d32 * eps)``.
    Elementwise ulps do not bound it: where the K-term sums cancel, a small element's fp32 error
    is hundreds of its own ulps (measured on the H100: 271).
    """
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from gdncheck.backends import load_backend

    be = load_backend(twin)
    case = Case(**M, **fields, seed=7)
    cpu = be.run(materialize(case, "cpu"))
    gpu = be.run(materialize(case, "cuda"))
    assert gpu.o.device.type == "cuda"
    d32 = 4 * (case.T * case.K) ** 0.5 * 2.0 ** -24

    def close(g, c, what):
        g = g.cpu()
        assert g.dtype == c.dtype and torch.equal(g.isnan(), c.isnan()), what  # poison left in the same places
        live = ~c.isnan()
        eps = torch.finfo(c.dtype).eps
        bound = d32 if c.dtype == torch.float32 else d32 + (4 * d32 * eps) ** 0.5
        assert _rel(g[live], c[live].double()) <= bound, f"{what}: rel_l2 {_rel(g[live], c[live].double()):.2e} > {bound:.2e}"

    close(gpu.o, cpu.o, "o")
    close(gpu.state, cpu.state, "state")
    if cpu.intermediate is not None:
        close(gpu.intermediate, cpu.intermediate, "intermediate")


def test_hashed_pool_on_cuda_equals_hashed_pool_on_cpu():
    """Pools past HASHED_POOL_ELEMENTS are drawn on the device: the same bits as the CPU's."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from gdncheck.inputs import hashed_normal

    n = (1 << 24) + 12345  # crosses a chunk edge
    for seed in (0, 22):
        assert torch.equal(hashed_normal(n, seed, "cuda").cpu(), hashed_normal(n, seed, "cpu"))
