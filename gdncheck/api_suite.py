"""The ``api`` suite: cases covering every pair of argument values of each FlashInfer entry point.

``python -m gdncheck.api_suite > cases/api.toml`` regenerates it (deterministic). For each entry
point the argument dimensions (:data:`DIMS`) and the constraints that make a combination
expressible by a case (:func:`_expressible`) give a covering array of strength 2 built greedily
(every pair of values that some valid combination holds appears in at least one case); small
spaces are enumerated in full. Documented-invalid combinations stay in: the backend must reject
them with the documented error.
"""
from __future__ import annotations

import itertools
import json

from gdncheck.api_calls import paged_case_fields

# (argument, values) per entry point; shape dims (zero_length) are arguments of the case, not of the API
DIMS: dict[str, list[tuple[str, tuple]]] = {
    "chunk_gated_delta_rule": [
        ("state_indices", ("absent", "unique", "repeated", "minus_one")),
        ("output_state_indices", ("absent", "present", "minus_one")),
        ("output_state", ("separate", "same_as_initial", "absent")),
        ("output_final_state", (True, False)),
        ("initial_state", ("present", "absent")),
        ("checkpoint_every_n_tokens", (0, 64, 128)),
        ("checkpoint_state_indices", ("absent", "present", "minus_one")),
        ("prefix_lens", ("absent", "aligned", "unaligned")),
        ("use_cp", ("auto", True, False)),
        ("backend", ("auto", "flashinfer")),
        ("gate_domain", ("linear", "log")),
        ("use_gate_in_kernel", (False, True)),
        ("beta_is_logit", (False, True)),
        ("cu_seqlens_cpu", ("absent", "present")),
        ("max_seqlen", ("absent", "exact")),
        ("use_qk_l2norm_in_kernel", (True, False)),
        ("zero_length", (False, True)),
    ],
    "chunk_gated_delta_rule_paged": [
        ("page_size", (64, 128)),
        ("prefix_lens", ("empty", "aligned", "unaligned", "page_interior")),
        ("zero_length", (False, True)),
        ("shared_prefix", (False, True)),
        ("gate_domain", ("linear", "log")),
        ("use_gate_in_kernel", (False, True)),
        ("beta_is_logit", (False, True)),
        ("use_qk_l2norm_in_kernel", (True, False)),
        ("slots", ("absent", "precomputed")),
    ],
    "gated_delta_rule_decode_paged": [
        ("last_page_len", ("one", "interior", "full")),
        ("state_dtype", ("float32", "bfloat16")),
        ("use_qk_l2norm", (True, False)),
        ("slots", ("absent", "precomputed")),
        ("backend", ("auto", "flashinfer")),
    ],
    "gated_delta_rule_decode": [
        ("use_qk_l2norm", (True, False)),
        ("backend", ("auto", "flashinfer")),
        ("dtype", ("bfloat16", "float16")),
    ],
    "cake_gated_delta_product_mtp": [
        ("T", (1, 2, 4, 16)),
        ("initial_state_indices", ("present", "minus_one")),
        ("output_state_indices", ("absent", "present", "minus_one")),
        ("disable_state_update", (False, True)),
        ("ssm_state_indices", ("absent", "present")),
    ],
}


def _documented_invalid(entry: str, v: dict) -> bool:
    """Whether a (partial) combination already holds every value of a documented-invalid combination."""
    from gdncheck.backends.api_spec import ENTRY_POINTS
    e = ENTRY_POINTS.get(entry)
    for inv in (e.invalid if e else ()):
        if all(k in v and v[k] in (w if isinstance(w, tuple) else (w,)) for k, w in inv.when.items()):
            return True
    return False


def _expressible(entry: str, v: dict) -> bool:
    if _documented_invalid(entry, v):
        return False  # covered by one case per documented error (invalid_cases), not mixed into the pairs
    return _expressible_shape(entry, v)


def _expressible_shape(entry: str, v: dict) -> bool:
    """Whether a (partial) combination can be a case: undefined behaviour (non-unique or -1
    state_indices without output_state_indices) and combinations a case cannot state are out."""
    g = v.get
    if entry == "chunk_gated_delta_rule":
        si, osi = g("state_indices"), g("output_state_indices")
        if si in ("repeated", "minus_one") and osi == "absent":
            return False  # precondition (unique ids), not a documented error
        if si == "absent" and osi not in (None, "absent"):
            return False  # write_indices need a pool in a Case
        if si == "absent" and g("checkpoint_state_indices") not in (None, "absent"):
            return False  # checkpoint rows live in the case pool
        if si not in (None, "absent") and g("checkpoint_every_n_tokens") not in (None, 0) \
                and g("checkpoint_state_indices") == "absent":
            return False  # a separate checkpoint tensor beside a pool: covered with plain states
        if si == "absent" and g("output_state") == "absent" and g("output_final_state") is False \
                and g("checkpoint_every_n_tokens") not in (None, 0):
            return False  # nothing the judge can read
        if si == "absent" and g("initial_state") == "absent" and g("output_state") == "same_as_initial":
            return False
        if g("use_gate_in_kernel") and g("gate_domain") == "log":
            return False  # gate_domain is ignored with use_gate_in_kernel: one value covers it
        return True
    if entry == "chunk_gated_delta_rule_paged":
        if g("shared_prefix") and g("prefix_lens") in ("empty", "unaligned"):
            return False  # nothing full to share
        if g("use_gate_in_kernel") and g("gate_domain") == "log":
            return False
        return True
    if entry == "cake_gated_delta_product_mtp":
        # the adapter's scratch slots for the per-token scatter need live rows
        return not (g("ssm_state_indices") == "present" and (g("initial_state_indices") == "minus_one"
                                                             or g("output_state_indices") == "minus_one"))
    return True


def _space(entry: str) -> int:
    n = 1
    for _, vals in DIMS[entry]:
        n *= len(vals)
    return n


def dims_of(entry: str, version: str | None = None) -> list[tuple[str, tuple]]:
    """The dimensions of ``entry``; with ``version`` = 0.7.2.post1, arguments new in 0.7.4 are held at
    their default (a covering array every version can run)."""
    from gdncheck.backends.api_spec import ENTRY_POINTS, V072
    if version != V072:
        return DIMS[entry]
    spec = ENTRY_POINTS[entry].arguments
    return [(n, vals if n not in spec or spec[n].since == V072 else (spec[n].default,)) for n, vals in DIMS[entry]]


def covering(entry: str, tries: int = 40, version: str | None = None) -> list[dict]:
    """Combinations covering every valid pair of values (all valid combinations when the space has
    <= 256 points). Greedy (AETG-like, seeded): each new combination starts from an uncovered pair
    and fills the other arguments, in a seeded random order, with the value that covers the most
    uncovered pairs while staying expressible; the best of ``tries`` candidates is kept. A pair no
    expressible combination holds is dropped (it shows as such in the coverage table)."""
    import random

    dims = dims_of(entry, version)
    names = [n for n, _ in dims]
    vals = dict(dims)
    space = 1
    for _, v in dims:
        space *= len(v)
    if space <= 256:
        full = [dict(zip(names, c)) for c in itertools.product(*[v for _, v in dims])]
        return [c for c in full if _expressible(entry, c)]
    rng = random.Random(0)
    pairs = {(a, x, b, y) for a, b in itertools.combinations(names, 2) for x in vals[a] for y in vals[b]
             if _expressible(entry, {a: x, b: y})}

    def gain(c):
        return sum((a, c[a], b, c[b]) in pairs for a, b in itertools.combinations(names, 2) if a in c and b in c)

    out = []
    while pairs:
        seed = min(pairs, key=repr)
        best, best_gain = None, -1
        for _ in range(tries):
            c = {seed[0]: seed[1], seed[2]: seed[3]}
            order = [n for n in names if n not in c]
            rng.shuffle(order)
            for n in order:
                opts = [x for x in vals[n] if _expressible(entry, {**c, n: x})]
                if not opts:
                    break
                rng.shuffle(opts)
                c[n] = max(opts, key=lambda x: gain({**c, n: x}))
            if len(c) == len(names) and _expressible(entry, c) and gain(c) > best_gain:
                best, best_gain = c, gain(c)
        if best is None:
            pairs.discard(seed)
            continue
        out.append({n: best[n] for n in names})
        pairs -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(names, 2)}
    return out


def case_of(entry: str, v: dict, i: int) -> dict:
    """One suite entry (a dict of Case fields) for combination ``v``."""
    tag = [f"api:{entry}"]
    if entry == "chunk_gated_delta_rule":
        seqlens = [70, 0, 130] if v["zero_length"] else [70, 130]
        N = len(seqlens)
        call = {k: v[k] for k in ("output_final_state", "output_state", "initial_state", "checkpoint_every_n_tokens",
                                  "checkpoint_state_indices", "prefix_lens", "use_cp", "backend", "gate_domain",
                                  "use_gate_in_kernel", "beta_is_logit", "cu_seqlens_cpu", "max_seqlen")}
        e = dict(op="prefill", seqlens=seqlens, H=2, HV=4, l2norm=v["use_qk_l2norm_in_kernel"],
                 gate_source="raw" if v["use_gate_in_kernel"] else "precomputed")
        si, osi = v["state_indices"], v["output_state_indices"]
        if si != "absent":
            reads = {"unique": [1, 3, 5][:N], "repeated": [2] * N, "minus_one": [-1, 3, 5][:N]}[si]
            e.update(pool_size=16, read_indices=reads)
            if osi != "absent":
                e["write_indices"] = {"present": [6, 7, 8][:N], "minus_one": [6, -1, 8][:N]}[osi]
        # drop arguments at their default so ids stay short and the call says what it pins
        defaults = {"output_final_state": True, "output_state": "same_as_initial" if si != "absent" else "separate",
                    "initial_state": "present", "checkpoint_every_n_tokens": 0, "checkpoint_state_indices": "absent",
                    "prefix_lens": "absent", "use_cp": "auto", "backend": "auto", "gate_domain": "linear",
                    "use_gate_in_kernel": False, "beta_is_logit": False, "cu_seqlens_cpu": "absent",
                    "max_seqlen": "absent"}
        call = {k: x for k, x in call.items() if x != defaults[k]}
        call.setdefault("api", 1)  # every api case has a call: the argument oracle judges it
        e["call"] = call
    elif entry == "chunk_gated_delta_rule_paged":
        seqlens = [10, 0, 150] if v["zero_length"] else [10, 150]
        call = {"page_size": v["page_size"], "prefix_lens": v["prefix_lens"], "shared_prefix": v["shared_prefix"],
                "gate_domain": v["gate_domain"], "use_gate_in_kernel": v["use_gate_in_kernel"],
                "beta_is_logit": v["beta_is_logit"], "slots": v["slots"]}
        e = dict(op="prefill", seqlens=seqlens, H=2, HV=4, l2norm=v["use_qk_l2norm_in_kernel"],
                 gate_source="raw" if v["use_gate_in_kernel"] else "precomputed", call=call)
        ok_ps = v["page_size"] % 64 == 0  # page_size 96: the documented ValueError; rows as for 64
        e.update(paged_case_fields("prefill", seqlens, call if ok_ps else {**call, "page_size": 64}))
    elif entry == "gated_delta_rule_decode_paged":
        ps = 64
        pre = {"one": [ps, 2 * ps], "interior": [5, ps + 20], "full": [ps - 1, 2 * ps - 1]}[v["last_page_len"]]
        call = {"page_size": ps, "prefix_lens": pre, "slots": v["slots"], "backend": v["backend"]}
        e = dict(op="decode", seqlens=[1, 1], H=2, HV=4, l2norm=v["use_qk_l2norm"], gate_source="raw",
                 state_dtype=v["state_dtype"], call=call)
        e.update(paged_case_fields("decode", [1, 1], call))
    elif entry == "gated_delta_rule_decode":
        e = dict(op="decode", seqlens=[1] * 3, H=2, HV=4, layout="v_last", gate_source="raw", dtype=v["dtype"],
                 l2norm=v["use_qk_l2norm"], call={"backend": v["backend"]})
    elif entry == "cake_gated_delta_product_mtp":
        T = v["T"]
        reads = [1, -1, 3] if v["initial_state_indices"] == "minus_one" else [1, 2, 3]
        e = dict(op="verify" if T > 1 else "decode", seqlens=[T] * 3, H=4, HV=4, V=64, gate_source="raw",
                 pool_size=8, read_indices=reads, disable_state_update=v["disable_state_update"])
        if v["output_state_indices"] != "absent":
            e["write_indices"] = [5, 6, 7] if v["output_state_indices"] == "present" else [5, -1, 7]
        e["call"] = {"api": 1} if v["ssm_state_indices"] == "absent" else {"ssm_state_indices": "present"}
    else:
        raise KeyError(entry)
    if not e.get("l2norm", True):  # without the L2 norm, beta |k|^2 <= 2 keeps the delta rule contractive
        e["qk_scale"] = round(0.5 / e.get("K", 128) ** 0.5, 6)
    e["name"] = f"api/{entry}/{i:03d}"
    e["tags"] = tag
    return e


def invalid_cases(entry: str) -> list[dict]:
    """One combination per documented error whose arguments are all dimensions of ``entry``: the
    first valid combination of the covering array with the error's values put in."""
    from gdncheck.backends.api_spec import ENTRY_POINTS
    from gdncheck.backends.api_spec import V072
    names = {n for n, _ in DIMS[entry]}
    bases = {None: covering(entry)[0], V072: covering(entry, version=V072)[0]}
    out = []
    for inv in ENTRY_POINTS[entry].invalid:
        if not set(inv.when) <= names:
            continue
        base = bases[V072 if inv.since == V072 else None]  # an error 0.7.2.post1 has: a call it can make
        v = {**base, **{k: (w[0] if isinstance(w, tuple) else w) for k, w in inv.when.items()}}
        if entry == "chunk_gated_delta_rule":  # make the rest of the call legal and expressible
            if v["output_state_indices"] != "absent" and v["state_indices"] == "absent":
                v["state_indices"] = "unique" if "state_indices" not in inv.when else v["state_indices"]
            if v["checkpoint_every_n_tokens"] == 0 and "checkpoint_every_n_tokens" not in inv.when:
                v["checkpoint_state_indices"], v["prefix_lens"] = "absent", "absent"
        if _expressible_shape(entry, v) and v not in out:
            out.append(v)
    return out


def suite_entries() -> list[dict]:
    from gdncheck.backends.api_spec import ENTRY_POINTS, V072
    out = []
    for entry in DIMS:
        combos = covering(entry)
        for i, v in enumerate(combos):
            out.append(case_of(entry, v, i))
        spec = ENTRY_POINTS[entry]
        if spec.since == V072 and any(a.since != V072 for a in spec.arguments.values()):
            for i, v in enumerate(covering(entry, version=V072)):  # the pairs 0.7.2.post1 can run
                e = case_of(entry, v, i)
                e["name"] = f"api/{entry}/v072/{i:03d}"
                e["tags"] = e["tags"] + ["v072"]
                out.append(e)
        for j, v in enumerate(invalid_cases(entry)):
            e = case_of(entry, v, len(combos) + j)
            e["name"] = e["name"] + "/invalid"
            e["tags"] = e["tags"] + ["documented-error"]
            out.append(e)
    return out


def _toml_value(x) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in x.items()) + " }"
    return json.dumps(x)


def render_toml() -> str:
    lines = ['description = "Every pair of argument values of each FlashInfer GDN entry point on SM90 '
             '(generated by python -m gdncheck.api_suite; coverage: reports/flashinfer/coverage.md)"', ""]
    for e in suite_entries():
        lines.append("[[case]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in e.items()]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_toml(), end="")
