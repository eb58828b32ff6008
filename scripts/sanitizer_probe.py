"""Planted memory bugs on the GPU, for recording real compute-sanitizer reports (the parser's tests).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  python scripts/sanitizer_probe.py oob
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck python scripts/sanitizer_probe.py uninit
    compute-sanitizer --tool racecheck python scripts/sanitizer_probe.py clean

``oob``: a Triton kernel whose store mask is off by one (``i <= n``) writes one float32 past a
256-element buffer (1024 bytes): memcheck reports an invalid __global__ write of size 4, 0 bytes
after the nearest allocation of size 1024. ``uninit``: a Triton kernel reads a ``torch.empty``
buffer nobody wrote (initcheck: uninitialised __global__ memory read). ``clean``: the same kernel
with the right mask (``ERROR SUMMARY: 0 errors``). Each prints the buffer's address range as a
``GDNCHECK-BUFFER`` line, as the sanitizer's child does, so the report's addresses map onto it.
Without the caching allocator off, the buffer sits inside a larger block and memcheck sees nothing.
"""
from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def store_one_past_kernel(x_ptr, n, BLOCK: tl.constexpr, OFF_BY_ONE: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = (i <= n) if OFF_BY_ONE else (i < n)  # i == n is one element past the end
    tl.store(x_ptr + i, tl.full((BLOCK,), 1.0, tl.float32), mask=mask)


@triton.jit
def copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(dst_ptr + i, tl.load(src_ptr + i, mask=i < n), mask=i < n)


def _announce(name: str, t: torch.Tensor) -> None:
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    print("GDNCHECK-BUFFER " + json.dumps({"name": name, "alloc_lo": lo, "alloc_hi": hi, "lo": lo, "hi": hi,
                                            "itemsize": t.element_size(), "row_bytes": 0, "dtype": "float32"}),
          flush=True)


def main(what: str) -> int:
    n = 256
    if what in ("oob", "clean"):
        x = torch.zeros(n, dtype=torch.float32, device="cuda")
        _announce("probe", x)
        store_one_past_kernel[(1,)](x, n, BLOCK=512, OFF_BY_ONE=what == "oob")
    elif what == "uninit":
        src = torch.empty(n, dtype=torch.float32, device="cuda")  # never written
        dst = torch.zeros(n, dtype=torch.float32, device="cuda")
        _announce("src", src)
        _announce("dst", dst)
        copy_kernel[(1,)](src, dst, n, BLOCK=256)
    else:
        print(f"usage: {sys.argv[0]} oob|uninit|clean", file=sys.stderr)
        return 2
    torch.cuda.synchronize()
    print(f"probe {what}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
