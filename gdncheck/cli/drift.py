"""``gdncheck drift position|rollout``."""
from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gdncheck.backends import load_backend
from gdncheck.cli import app, command
from gdncheck.data.drift import DriftResult
from gdncheck.drift import _template, position_error, rollout

if True:  # the drift command group
    drift_app = typer.Typer(help="Error drift: along long sequences, over decode rollouts, at the logits.",
                            no_args_is_help=True)
    app.add_typer(drift_app, name="drift")
    con = Console(width=None if sys.stdout.isatty() else 100)

    common = dict(
        H=typer.Option(16, "--H"), HV=typer.Option(32, "--HV"), K=typer.Option(128, "--K"), V=typer.Option(128, "--V"),
    )

    @command(drift_app, "position")
    def position_cmd(
        backend: list[str] = typer.Option(..., "--backend", "-b", help="backend name (repeatable)"),
        T: int = typer.Option(16384, "--T", help="tokens in the sequence"),
        bins: int = typer.Option(32, help="position bins"),
        H: int = common["H"], HV: int = common["HV"], K: int = common["K"], V: int = common["V"],
        dtype: str = typer.Option("bfloat16"), state_dtype: str = typer.Option("float32"),
        layout: str = typer.Option("k_last", help="k_last | v_last (switched per backend when it supports only the other)"),
        gate_source: str = typer.Option("precomputed"), gate_dist: str = typer.Option("model"),
        seed: int = typer.Option(0), vocab: int = typer.Option(32768, help="logit proxy vocabulary"),
        device: str | None = typer.Option(None, help="default: the backend's device"),
        out: Path = typer.Option(Path("drift"), "--out", help="output directory"),
    ):
        """Output error against position in one long prefill, per backend."""
        tpl = _template(H, HV, K, V, dtype, state_dtype, layout, gate_source, gate_dist, seed)
        res = DriftResult(device=str(device or ""))
        tab = Table(title=f"position error, T={T}")
        for c in ("backend", "status", "first bin", "last bin", "last/first", "flip rate"):
            tab.add_column(c)
        for name in backend:
            cv = position_error(load_backend(name), tpl, T, bins, device=device, vocab=vocab, proj_seed=seed)
            res.position.append(cv)
            if cv.status == "ok" and cv.rel_l2:
                ratio = cv.rel_l2[-1] / cv.rel_l2[0] if cv.rel_l2[0] else float("inf")
                tab.add_row(name, cv.status, f"{cv.rel_l2[0]:.3e}", f"{cv.rel_l2[-1]:.3e}", f"{ratio:.2f}",
                            f"{cv.flip_rate:.4%}")
            else:
                tab.add_row(name, cv.status, cv.reason or "", "", "", "")
        con.print(tab)
        for f in _write(res, out, "drift-position"):
            con.print(f"wrote {f}")

    @command(drift_app, "rollout")
    def rollout_cmd(
        backend: list[str] = typer.Option(..., "--backend", "-b", help="backend name (repeatable)"),
        steps: int = typer.Option(1000, help="decode steps"),
        N: int = typer.Option(4, "--N", help="sequences decoded together"),
        state_dtype: list[str] = typer.Option(["float32", "bfloat16"], "--state-dtype", help="repeatable"),
        H: int = common["H"], HV: int = common["HV"], K: int = common["K"], V: int = common["V"],
        dtype: str = typer.Option("bfloat16"), layout: str = typer.Option("k_last"),
        gate_source: str = typer.Option("raw"), gate_dist: str = typer.Option("model"),
        seed: int = typer.Option(0), points: int = typer.Option(40, help="log-spaced error points"),
        vocab: int = typer.Option(32768), device: str | None = typer.Option(None),
        out: Path = typer.Option(Path("drift"), "--out"),
    ):
        """Decode rollouts carrying each backend's own state, against float64."""
        res = DriftResult(device=str(device or ""))
        tab = Table(title=f"rollout, {steps} steps")
        for c in ("backend", "state", "status", "state err (final)", "floor", "growth", "output err", "flip rate"):
            tab.add_column(c)
        for sd in state_dtype:
            tpl = _template(H, HV, K, V, dtype, sd, layout, gate_source, gate_dist, seed, N)
            for name in backend:
                cv = rollout(load_backend(name), tpl, steps, device=device, vocab=vocab, points=points, proj_seed=seed)
                res.rollout.append(cv)
                if cv.status == "ok":
                    gr = "n/a" if cv.growth is None else f"{cv.growth:.2f}"
                    tab.add_row(name, sd, "ok", f"{cv.state_rel_l2[-1]:.3e}", f"{cv.state_floor[-1]:.1e}", gr,
                                f"{cv.o_rel_l2[-1]:.3e}", f"{cv.flip_rate:.4%}")
                else:
                    tab.add_row(name, sd, cv.status, cv.reason or "", "", "", "", "")
        con.print(tab)
        for f in _write(res, out, "drift-rollout"):
            con.print(f"wrote {f}")


def _write(result: DriftResult, out: Path, stem: str) -> list[Path]:
    from gdncheck.report import plots

    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{stem}.json"
    js.write_text(result.model_dump_json(indent=1))
    files = [js]
    for title, fig in plots.drift_figures(result):
        png = out / f"{stem}-{plots.slug(title)}.png"
        fig.savefig(png, dpi=110, bbox_inches="tight")
        plots.close(fig)
        files.append(png)
    return files

