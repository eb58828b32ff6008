"""Side by side on one device: ``torch.kthvalue`` (what the metrics used) against
:func:`gdncheck.metrics.nearest_rank` for the p50 / p99 ULP distances of one whole pool.

    python scripts/bench_quantile.py [--device cuda] [--elements 286261248]

The default size is a Qwen3.5-397B TP1 decode pool of 273 slots (273 x 64 x 128 x 128).
"""
import argparse
import time

import torch

from gdncheck.metrics import nearest_rank


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--elements", type=int, default=273 * 64 * 128 * 128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    dev = torch.device(a.device)
    g = torch.Generator(device=dev).manual_seed(a.seed)
    # ULP distances of a good kernel: mostly a few units, a thin tail of large ones
    x = torch.randint(0, 40, (a.elements,), generator=g, device=dev)
    tail = torch.rand(a.elements, generator=g, device=dev) < 1e-4
    x[tail] = torch.randint(1 << 16, 1 << 30, (int(tail.sum()),), generator=g, device=dev)
    n = x.numel()
    ks = [min(n, max(1, int(round(q * (n - 1))) + 1)) for q in (0.5, 0.99)]
    nearest_rank(x[:1000], (0.5,))  # first-call overheads out of the timing
    for rep in range(2):
        want, t_kth = _timed(lambda: [float(torch.kthvalue(x, k).values.item()) for k in ks], dev)
        got, t_nr = _timed(lambda: nearest_rank(x, (0.5, 0.99)), dev)
        assert got == want, (got, want)
        print(f"rep {rep}: {n} elements on {dev}: kthvalue {t_kth:.3f} s, nearest_rank {t_nr:.3f} s, "
              f"ratio {t_kth / t_nr:.1f}x (same p50/p99: {got})")


if __name__ == "__main__":
    main()
