"""Reproduce one case: resolve it (id, name or JSON), rebuild its inputs, run backends, print metrics.

The inputs digest (:func:`gdncheck.cases.inputs_digest`) is printed with every run, so the same
case id can be checked to give the same tensors on two machines. A *bundle* freezes the inputs:
``case.json``, ``inputs.safetensors`` (every input tensor as a contiguous copy; shape, strides and
the digest in the metadata) and a README line; :func:`load_bundle` rebuilds the
:class:`~gdncheck.cases.Inputs` from it, strided views included, without the generator.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from gdncheck.backends.base import Backend
from gdncheck.data.errors import UsageError
from gdncheck.data.case import Case
from gdncheck.inputs import Inputs, inputs_digest, materialize
from gdncheck.suites import SuiteError, list_suites, load_suite

BUNDLE_TENSORS = "inputs.safetensors"
BUNDLE_CASE = "case.json"


class ReproError(UsageError):
    """The case or bundle cannot be resolved; the message says what was expected."""


def find_case(spec: str, results: str | Path | None = None, suites: list[str] | None = None) -> Case:
    """A case from JSON (``{...}``), or by id / id prefix / name in the suites or a results JSONL."""
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            return Case.model_validate_json(spec)
        except ValueError as e:
            raise ReproError(f"case JSON: {e}") from None
    found: dict[str, Case] = {}
    if results is not None:
        p = Path(results)
        if not p.exists():
            raise ReproError(f"{p}: results file not found")
        for ln in p.read_text().splitlines():
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue  # a torn last line of an interrupted run
            if isinstance(rec, dict) and "case" in rec and (rec.get("case_id", "").startswith(spec)
                                                            or rec["case"].get("name") == spec):
                c = Case(**rec["case"])
                found[c.id] = c
    for s in suites or list_suites():
        for c in load_suite(s):
            if c.id.startswith(spec) or c.name == spec:
                found[c.id] = c
    if not found:
        where = f"suites {', '.join(suites or list_suites())}" + (f" and {results}" if results else "")
        raise ReproError(f"case {spec!r}: no case id, id prefix or name matches in {where}")
    exact = [c for c in found.values() if c.id == spec or c.name == spec]
    if len(exact) == 1:
        return exact[0]
    if len(found) > 1:
        raise ReproError(f"case {spec!r}: ambiguous, matches {', '.join(sorted(found)[:8])}")
    return next(iter(found.values()))


# ---------------------------------------------------------------- bundles

def save_bundle(inputs: Inputs, directory: str | Path) -> Path:
    """Write ``case.json``, ``inputs.safetensors`` and ``README`` into ``directory``."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    c = inputs.case
    tensors, layout = {}, {}
    for name, t in inputs.tensors().items():
        tensors[name] = t.detach().to("cpu").contiguous().clone()
        layout[name] = {"shape": list(t.shape), "stride": list(t.stride()), "contiguous": t.is_contiguous()}
    digest = inputs_digest(inputs)
    meta = {"case": c.model_dump_json(), "case_id": c.id, "digest": digest, "layout": json.dumps(layout)}
    save_file(tensors, str(d / BUNDLE_TENSORS), metadata=meta)
    (d / BUNDLE_CASE).write_text(c.model_dump_json(indent=2) + "\n")
    (d / "README").write_text(
        f"gdncheck case {c.id} ({c.name or 'unnamed'}), inputs digest {digest}: "
        f"rerun with `gdncheck repro --load {d}` (add --backend NAME).\n")
    return d


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> Inputs:
    """The :class:`Inputs` saved by :func:`save_bundle`, on ``device``, with the saved strides."""
    from safetensors import safe_open

    d = Path(directory)
    f = d / BUNDLE_TENSORS
    if not f.exists():
        raise ReproError(f"{d}: not a bundle (no {BUNDLE_TENSORS})")
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    try:
        case = Case.model_validate_json(meta["case"])
        layout = json.loads(meta["layout"])
    except (KeyError, ValueError) as e:
        raise ReproError(f"{f}: bundle metadata unreadable: {e}") from None
    dev = torch.device(device)

    def place(name: str) -> torch.Tensor | None:
        t = tensors.get(name)
        if t is None:
            return None
        lay = layout.get(name, {})
        buf = torch.empty_strided(tuple(lay.get("shape", t.shape)), tuple(lay.get("stride", t.stride())),
                                  dtype=t.dtype, device=dev)
        buf.copy_(t)
        return buf

    names = ("q", "k", "v", "A_log", "dt_bias", "a", "b", "g", "beta", "cu_seqlens", "state",
             "read_indices", "write_indices", "out", "intermediate")
    inputs = Inputs(case=case, **{n: place(n) for n in names})
    got = inputs_digest(inputs)
    if meta.get("digest") and got != meta["digest"]:
        raise ReproError(f"{f}: inputs digest {got} differs from the saved {meta['digest']}")
    return inputs


# ---------------------------------------------------------------- running

__all__ = ["ReproError", "find_case", "save_bundle", "load_bundle"]
