"""``gdncheck bench oracle``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from gdncheck.bench import DEFAULT_SHAPE, DEFAULT_TS, _devices, _table, bench_oracle, environment
from gdncheck.cli import app, command

if True:  # the bench command group
    bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
    app.add_typer(bench_app, name="bench")

    @command(bench_app, "oracle")
    def oracle_cmd(
        device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default: CPU, and CUDA when visible")] = None,
        T: Annotated[Optional[list[int]], typer.Option("--T", help="sequence length (repeatable)")] = None,
        repeats: Annotated[int, typer.Option(help="timed calls per form (median), after a warm-up")] = 3,
        recurrent_repeats: Annotated[Optional[int], typer.Option(help="timed calls of the recurrent form; default --repeats, 1 on CPU at T >= 4096")] = None,
        H: Annotated[int, typer.Option("--H")] = DEFAULT_SHAPE["H"],
        HV: Annotated[int, typer.Option("--HV")] = DEFAULT_SHAPE["HV"],
        K: Annotated[int, typer.Option("--K")] = DEFAULT_SHAPE["K"],
        V: Annotated[int, typer.Option("--V")] = DEFAULT_SHAPE["V"],
        chunk_size: Annotated[int, typer.Option(help="chunk size of the chunked form")] = 64,
        json_path: Annotated[Optional[Path], typer.Option("--json", help="also write {env, rows} here")] = None,
    ) -> None:
        """Time the float64 oracle's chunked and recurrent forms side by side."""
        import torch

        con, err = Console(), Console(stderr=True)
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            err.print(f"[red]error:[/red] --device {device} but no CUDA device is visible")
            raise typer.Exit(3)
        Ts = tuple(T) if T else DEFAULT_TS
        try:
            devs = _devices(device)
            env = environment(devs)
            con.print(", ".join(f"{k}={v}" for k, v in env.items() if v is not None))
            rows = bench_oracle(device, Ts, repeats, shape=dict(H=H, HV=HV, K=K, V=V),
                                recurrent_repeats=recurrent_repeats, chunk_size=chunk_size,
                                on_row=lambda r: err.print(f"  {r['device']} T={r['T']}: chunked {r['chunked_s']:.4f} s, "
                                                           f"recurrent {r['recurrent_s']:.4f} s"))
        except ValueError as e:
            err.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        con.print(_table(rows))
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
            con.print(f"wrote {json_path}")
