"""Suites: TOML files of cases (``cases/*.toml``, installed as ``gdncheck_cases``).

A file has ``description``, ``axes``, ``[defaults]`` and ``[[case]]`` tables; a case's ``matrix``
expands to the product of its values, and sugar keys (``batch``/``seqlen``, ``slots``) resolve to
case fields. Errors name the file, the line and the key.
"""
from __future__ import annotations

import difflib
import tomllib
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from gdncheck.data.case import Case
from gdncheck.data.errors import UsageError

class SuiteError(UsageError):
    """A suite file is malformed: names the file, the key or line, and what was expected."""


def suites_dir() -> Path:
    return Path(str(resources.files("gdncheck_cases")))


def list_suites() -> list[str]:
    return sorted(p.stem for p in suites_dir().glob("*.toml"))


_SUGAR = ("matrix", "vars", "batch", "seqlen", "slots")
_SLOT_KEYS = {"first", "step", "reverse", "pad", "pad_every", "pad_tail", "free"}


def _merge(e: dict, key: str, v) -> dict:
    """One matrix value into an entry: a table merges its keys (``tags`` append, ``vars`` merge)."""
    if not isinstance(v, dict):
        return {**e, key: v}
    e = dict(e)
    for k, x in v.items():
        if k == "tags":
            e["tags"] = list(e.get("tags", [])) + list(x)
        elif k == "vars":
            e["vars"] = {**e.get("vars", {}), **x}
        else:
            e[k] = x
    return e


def _slots(spec: dict, N: int) -> tuple[list[int], int]:
    """``slots`` sugar -> (read_indices, minimal pool size).

    Keys: ``first`` (1: slot 0 stays the reserved dummy), ``step`` (1), ``reverse`` (false),
    ``pad`` (row numbers padded with -1), ``pad_every`` (every k-th row padded), ``pad_tail``
    (last rows padded, as a CUDA-graph bucket), ``free`` (extra unused slots).
    """
    bad = set(spec) - _SLOT_KEYS
    if bad:
        raise SuiteError(f"slots: unknown key(s) {sorted(bad)}; expected {sorted(_SLOT_KEYS)}")
    first, step, free = int(spec.get("first", 1)), int(spec.get("step", 1)), int(spec.get("free", 0))
    if first < 0 or step < 1 or free < 0:
        raise SuiteError("slots: expected first >= 0, step >= 1, free >= 0")
    pad = set(spec.get("pad", []))
    k = int(spec.get("pad_every", 0))
    if k > 0:
        pad |= {n for n in range(N) if n % k == k - 1}
    pad |= set(range(N - int(spec.get("pad_tail", 0)), N))
    slots = [first + n * step for n in range(N)]
    if spec.get("reverse", False):
        slots.reverse()
    read = [-1 if n in pad else s for n, s in enumerate(slots)]
    return read, first + N * step + free


def _finish(e: dict) -> dict:
    """Resolve the sugar keys of one expanded entry and fill ``{placeholders}`` in name and tags.

    ``batch`` + ``seqlen`` -> ``seqlens = [seqlen] * batch``; ``slots`` -> ``read_indices`` (and
    ``pool_size`` unless given); ``vars`` only feed the placeholders. Placeholders see the
    entry's fields, its ``vars``, ``N``, ``T`` (tokens per row or in all) and ``tokens``.
    """
    e = dict(e)
    var = e.pop("vars", {}) or {}
    if "batch" in e:
        if "seqlens" in e:
            raise SuiteError("batch: give either batch (+ seqlen) or seqlens, not both")
        e["seqlens"] = [int(e.pop("seqlen", 1))] * int(e.pop("batch"))
    elif "seqlen" in e:
        raise SuiteError("seqlen: needs batch")
    if "slots" in e:
        if "read_indices" in e:
            raise SuiteError("slots: give either slots or read_indices, not both")
        spec = e.pop("slots")
        if not isinstance(spec, dict):
            raise SuiteError(f"slots: expected a table, got {type(spec).__name__}")
        e["read_indices"], need = _slots(spec, len(e.get("seqlens", [])))
        e.setdefault("pool_size", need)
    lens = e.get("seqlens") or [0]
    ctx = {**e, **var, "N": len(lens), "tokens": sum(lens),
           "T": sum(lens) if e.get("op") == "prefill" else lens[0]}
    try:
        if isinstance(e.get("name"), str):
            e["name"] = e["name"].format_map(ctx)
        if "tags" in e:
            e["tags"] = [t.format_map(ctx) if isinstance(t, str) else t for t in e["tags"]]
    except (KeyError, ValueError, IndexError) as err:
        raise SuiteError(f"name/tags: bad placeholder {err}; known: {sorted(ctx)}") from None
    return e


def _expand(entry: dict, axes: dict | None = None) -> list[dict]:
    """A ``[[case]]`` table whose ``matrix`` keys expand to their product.

    A matrix value is a list of values for that key, a list of tables (each merged into the
    entry: coupled keys such as ``H``/``HV``) or the name of a list under top-level ``axes``.
    """
    entry = dict(entry)
    matrix = entry.pop("matrix", None) or {}
    if not isinstance(matrix, dict):
        raise SuiteError(f"matrix: expected a table of key -> list, got {type(matrix).__name__}")
    out = [entry]
    for key, vals in matrix.items():
        if isinstance(vals, str):
            if vals not in (axes or {}):
                raise SuiteError(f"matrix.{key}: unknown axis {vals!r}; defined axes: {sorted(axes or {})}")
            vals = axes[vals]
        if not isinstance(vals, list):
            raise SuiteError(f"matrix.{key}: expected a list of values or an axis name, got {type(vals).__name__}")
        out = [_merge(e, key, v) for e in out for v in vals]
    return [_finish(e) for e in out]


def _case_lines(text: str) -> list[int]:
    """1-based line of each ``[[case]]`` header."""
    return [i for i, ln in enumerate(text.splitlines(), 1) if ln.strip().startswith("[[case]]")]


def _key_line(text: str, start: int, key: str) -> int | None:
    """Line of ``key =`` in the table starting at line ``start`` (None if not written there)."""
    lines = text.splitlines()
    for i in range(start, len(lines)):
        ln = lines[i].strip()
        if ln.startswith("["):
            break
        if ln.split("=", 1)[0].strip().strip('"') == key or f" {key} =" in ln or f"{{{key} =" in ln:
            return i + 1
    return None


def _describe(err: ValidationError) -> tuple[str, str]:
    """(key, what was expected) of a pydantic error, in suite-file words."""
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "case"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        known = list(Case.model_fields) + list(_SUGAR)
        near = difflib.get_close_matches(str(first["loc"][0]), known, n=1)
        msg = "unknown key" + (f" (did you mean '{near[0]}'?)" if near else "") + \
            f"; expected one of {', '.join(known)}"
    elif first["type"] == "value_error" and msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if ":" in msg.split(" ")[0]:  # the model's own checks name their key first
            loc, _, msg = msg.partition(": ")
    return loc, msg


def load_suite_file(path: str | Path) -> list[Case]:
    """Read a suite TOML file: ``description``, ``axes``, ``[defaults]`` and ``[[case]]`` tables."""
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SuiteError(f"{path}: malformed TOML: {e}") from None
    except OSError as e:
        raise SuiteError(f"{path}: cannot read: {e.strerror}") from None
    unknown = set(data) - {"defaults", "case", "description", "axes"}
    if unknown:
        raise SuiteError(f"{path}: unknown top-level key(s) {sorted(unknown)}; "
                         "expected description, axes, [defaults], [[case]]")
    defaults, axes = data.get("defaults", {}), data.get("axes", {})
    headers = _case_lines(text)
    cases: list[Case] = []
    for i, entry in enumerate(data.get("case", [])):
        line = headers[i] if i < len(headers) else None
        where = f"{path}:{line}" if line else str(path)
        label = f"case #{i} ({entry.get('name', '?')})"
        try:
            expanded = _expand({**defaults, **entry}, axes)
        except SuiteError as e:
            raise SuiteError(f"{where}: {label}: {e}") from None
        for e in expanded:
            try:
                cases.append(Case(**e))
            except ValidationError as err:
                key, msg = _describe(err)
                kl = _key_line(text, line, key.split(".")[0]) if line else None
                at = f"{path}:{kl}" if kl else where
                raise SuiteError(f"{at}: {label}: key '{key}': {msg}") from None
    return cases


def load_suite(name_or_path: str) -> list[Case]:
    """A suite by name (``smoke``, ``models``, ``edges``, ...) or by path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return load_suite_file(p)
    f = suites_dir() / f"{name_or_path}.toml"
    if not f.exists():
        raise SuiteError(f"suite {name_or_path!r}: not found; known suites: {', '.join(list_suites())}")
    return load_suite_file(f)
