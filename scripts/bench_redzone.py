"""Cost of the red zones: a suite run with them on and off, case by case in one process, side by side.

    python scripts/bench_redzone.py [--suite smoke] [-b twin-fla -b twin-flashinfer] [--repeat 2] [--device cpu]

Each (case, backend) pair runs with ``GDNCHECK_REDZONE=0`` and ``=1`` alternately, ``--repeat`` times
each, on one torch thread; the least CPU time of each is kept (the least disturbed by other load).
Time is the whole :func:`gdncheck.execute.run_case` (inputs, guarded copy, call, guard and input checks,
oracle, metrics) in CPU seconds of this process; "red zone work" times the guarded copy and the
checks alone against the plain copy they replace. Memory is the bytes the guards (and holes of
strided views) add to the inputs' own storage.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from gdncheck import redzone
from gdncheck.backends import load_backend
from gdncheck.inputs import materialize
from gdncheck.suites import load_suite
from gdncheck.execute import case_bytes, run_case, too_large


def _time(backend, case, device: str, on: bool) -> float:
    """CPU seconds of this process for one run_case (wall time on a shared machine is mostly the
    neighbours' load)."""
    os.environ["GDNCHECK_REDZONE"] = "1" if on else "0"
    t0 = time.process_time()
    r = run_case(backend, case, device=device, twin=None)
    if on and r.contracts is not None and (r.contracts.redzone or r.contracts.inputs_modified):
        raise SystemExit(f"{backend.name} {case.name}: red zone violated: {r.contracts.redzone}")
    return time.process_time() - t0


def _copy_time(inp) -> float:
    """CPU seconds of the plain copy the red zones replace (Inputs.clone)."""
    t0 = time.process_time()
    inp.clone()
    return time.process_time() - t0


def _zone_work(inp) -> float:
    """CPU seconds of the red zones' own work on one case: guarded copy, guard and input checks."""
    t0 = time.process_time()
    rz = redzone.RedZones()
    with rz:
        g = rz.guard_inputs(inp)
    redzone.violations(rz, inp, g)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="smoke")
    ap.add_argument("-b", "--backend", action="append", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    backends = [load_backend(s) for s in (a.backend or ["twin-fla", "twin-flashinfer"])]
    cases = [c for c in load_suite(a.suite) if too_large(c, torch.device(a.device)) is None]
    torch.set_num_threads(1)  # CPU time of one thread: comparable between runs on a loaded machine
    off_t = on_t = zone_t = copy_t = 0.0
    ratios = []
    in_bytes = guard_bytes = peak = 0
    worst = (0.0, "")
    pairs = 0
    for c in cases:
        inp = materialize(c, a.device)
        own = sum(t.untyped_storage().nbytes() for t in inp.tensors().values())
        rz = redzone.RedZones()
        rz.guard_inputs(inp)
        extra = sum(z.flat.numel() * z.flat.element_size() for z in rz.zones) - own
        in_bytes += own
        peak += case_bytes(c)
        guard_bytes += extra
        if extra / own > worst[0]:
            worst = (extra / own, c.name or c.id)
        plain = min(_copy_time(inp) for _ in range(a.repeat))
        for b in backends:
            if b.supports(c) is not None:
                continue
            off, on = [], []
            for _ in range(a.repeat):  # interleaved: slow phases of the machine hit both
                off.append(_time(b, c, a.device, False))
                on.append(_time(b, c, a.device, True))
            off_t, on_t = off_t + min(off), on_t + min(on)
            ratios.append(min(on) / min(off))
            zone_t += min(_zone_work(inp) for _ in range(a.repeat))
            copy_t += plain
            pairs += 1
    os.environ.pop("GDNCHECK_REDZONE", None)
    q = statistics.quantiles(ratios, n=20) if len(ratios) > 1 else ratios * 19
    print(f"red zones on {a.suite} ({len(cases)} cases, {pairs} pairs, {a.device}, best of {a.repeat}):")
    print(f"{'':24}{'off':>12}{'on':>12}{'ratio':>10}")
    print(f"{'time, all pairs (s)':24}{off_t:12.2f}{on_t:12.2f}{on_t / off_t:10.3f}")
    print(f"{'red zone work (s)':24}{copy_t:12.2f}{zone_t:12.2f}{'':10}  (plain copy vs guarded copy + checks, "
          f"{100 * (zone_t - copy_t) / off_t:.1f}% of the off time)")
    print(f"{'time per pair, median':24}{'':24}{statistics.median(ratios):10.3f}")
    print(f"{'time per pair, p95':24}{'':24}{q[18]:10.3f}")
    print(f"{'input bytes (MiB)':24}{in_bytes / 2**20:12.2f}{(in_bytes + guard_bytes) / 2**20:12.2f}"
          f"{(in_bytes + guard_bytes) / in_bytes:10.3f}")
    print(f"{'device peak model (MiB)':24}{peak / 2**20:12.2f}{(peak + guard_bytes) / 2**20:12.2f}"
          f"{(peak + guard_bytes) / peak:10.3f}  (execute.case_bytes: inputs, oracle, metrics)")
    print(f"memory: largest ratio {1 + worst[0]:.2f} on {worst[1]} (guards are >= 4 KiB a side: small cases pay most)")


if __name__ == "__main__":
    main()
