"""``gdncheck bench oracle``: the float64 oracle's chunked and recurrent forms, timed side by side.

One sequence of ``T`` tokens at Qwen3-Next's GDN shape (H=16, HV=32, K=V=128) in float64, on CPU
and on CUDA when one is visible. Each form gets a warm-up call first (on a prefix of at most
256 tokens: the recurrent loop's work per token does not depend on T), then the median of its
timed calls; on CUDA every timed call is bracketed by ``torch.cuda.synchronize()``. The
recurrent form at ``T >= 4096`` on CPU is timed once by default (about 4-15 s a call on two
cores). Every row also reports the largest relative difference between the two forms' outputs
and final states, a sanity column that should stay near 1e-15.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Optional


DEFAULT_SHAPE = {"H": 16, "HV": 32, "K": 128, "V": 128}
DEFAULT_TS = (256, 1024, 4096)
# The recurrent form on CPU at T >= this many tokens is timed once unless asked otherwise.
LONG_RECURRENT_T = 4096
WARMUP_T = 256

__all__ = ["bench_oracle", "environment", "DEFAULT_SHAPE"]


def _devices(device: str | None) -> list[str]:
    import torch

    if device is not None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but no CUDA device is visible")
        return [device]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return _cpu_name()


def environment(devices: list[str] | None = None) -> dict[str, Any]:
    """What the timings depend on: versions, threads, and the name of each device."""
    import torch

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    for d in devices or []:
        env[f"device_name[{d}]"] = _device_name(d)
    return env


def _inputs(T: int, shape: dict[str, int], device: str, seed: int) -> dict:
    """Random float64 inputs: L2-normalised q/k, log decays in (-0.5, 0], a non-zero state."""
    import torch

    H, HV, K, V = shape["H"], shape["HV"], shape["K"], shape["V"]
    HS = max(H, HV)
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=f64)

    x = dict(q=r(1, T, H, K), k=r(1, T, H, K), v=r(1, T, HV, V),
             g=-0.5 * torch.rand(1, T, HS, generator=gen, dtype=f64),
             beta=torch.rand(1, T, HS, generator=gen, dtype=f64), initial_state=0.1 * r(1, HS, K, V))
    return {n: t.to(device) for n, t in x.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def _timed(fn: Callable[[], Any], device: str, repeats: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


def _rel_diff(a, b) -> float:
    """``max|a - b| / max|b|`` (0 when both are zero)."""
    num = (a - b).abs().max().item() if a.numel() else 0.0
    den = b.abs().max().item() if b.numel() else 0.0
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def bench_oracle(
    device: str | None = None,
    Ts=DEFAULT_TS,
    repeats: int = 3,
    *,
    shape: dict[str, int] | None = None,
    recurrent_repeats: int | None = None,
    chunk_size: int = 64,
    seed: int = 0,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Time the oracle's chunked and recurrent forms; one row per (device, T).

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; None means CPU, and CUDA when visible.
        Ts: sequence lengths (one sequence each).
        repeats: timed calls per form (median reported), after one warm-up call.
        shape: overrides of ``DEFAULT_SHAPE`` (keys ``H``, ``HV``, ``K``, ``V``).
        recurrent_repeats: timed calls of the recurrent form; None means ``repeats``, except
            1 on CPU at ``T >= 4096``.
        on_row: called with each row as soon as it is measured (progress output).

    Returns:
        Rows with ``device``, ``device_name``, ``T``, the shape, ``chunked_s`` and
        ``recurrent_s`` (medians, seconds), ``ratio`` (recurrent / chunked), the raw times,
        the repeat counts, ``max_rel_diff`` between the forms, ``torch`` and ``threads``.
    """
    import torch

    from gdncheck_reference import gated_delta_rule

    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    if recurrent_repeats is not None and recurrent_repeats < 1:
        raise ValueError(f"recurrent_repeats: must be >= 1, got {recurrent_repeats}")
    shp = dict(DEFAULT_SHAPE)
    unknown = set(shape or {}) - set(shp)
    if unknown:
        raise ValueError(f"shape: unknown keys {sorted(unknown)}; expected a subset of {sorted(shp)}")
    shp.update(shape or {})
    Ts = [int(t) for t in Ts]
    if any(t < 1 for t in Ts):
        raise ValueError(f"Ts: sequence lengths must be >= 1, got {Ts}")
    rows = []
    for dev in _devices(device):
        name = _device_name(dev)
        warm = _inputs(min(WARMUP_T, max(Ts)), shp, dev, seed)
        for form in ("chunked", "recurrent"):  # kernels, BLAS handles, allocator pools
            gated_delta_rule(**warm, use_qk_l2norm=True, form=form, chunk_size=chunk_size)
        del warm
        for T in Ts:
            x = _inputs(T, shp, dev, seed)

            def run(form, x=x):
                return lambda: gated_delta_rule(**x, use_qk_l2norm=True, form=form, chunk_size=chunk_size)

            n_rec = recurrent_repeats
            if n_rec is None:
                n_rec = 1 if dev == "cpu" and T >= LONG_RECURRENT_T else repeats
            t_chk, chk = _timed(run("chunked"), dev, repeats)
            t_rec, rec = _timed(run("recurrent"), dev, n_rec)
            c_s, r_s = statistics.median(t_chk), statistics.median(t_rec)
            row = dict(
                device=dev, device_name=name, T=T, **shp, chunk_size=chunk_size,
                chunked_s=c_s, recurrent_s=r_s, ratio=r_s / c_s if c_s > 0 else float("inf"),
                chunked_times=t_chk, recurrent_times=t_rec, chunked_repeats=repeats, recurrent_repeats=n_rec,
                max_rel_diff=max(_rel_diff(chk.o, rec.o), _rel_diff(chk.final_state, rec.final_state)),
                torch=torch.__version__, threads=torch.get_num_threads(),
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
            del x, chk, rec
    return rows


def _table(rows: list[dict]):
    from rich.table import Table

    shapes = sorted({(r["H"], r["HV"], r["K"], r["V"], r["chunk_size"]) for r in rows})
    what = "; ".join(f"H={h} HV={hv} K={k} V={v}, chunk {c}" for h, hv, k, v, c in shapes)
    t = Table(title=f"float64 oracle, {what}: median seconds per call")
    for col in ("device", "T", "chunked s", "recurrent s", "rec/chunked", "max rel diff", "repeats c/r"):
        t.add_column(col, justify="left" if col == "device" else "right")
    for r in rows:
        t.add_row(r["device"], str(r["T"]), f"{r['chunked_s']:.4f}", f"{r['recurrent_s']:.4f}", f"{r['ratio']:.1f}x",
                  f"{r['max_rel_diff']:.1e}", f"{r['chunked_repeats']}/{r['recurrent_repeats']}")
    return t
