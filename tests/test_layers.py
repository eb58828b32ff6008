"""The package's imports run one way: each module imports only its own layer or the layers below
it, and no two modules import each other, directly or in a circle (function-level imports count)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "gdncheck"

# bottom to top (issue: schemas, then oracle and metrics, the judge, execution, workflows, rendering, CLI)
LAYERS = [
    ("data", ["gdncheck", "gdncheck.data", "gdncheck.progress"]),
    ("inputs", ["gdncheck.suites", "gdncheck.inputs", "gdncheck.budgets", "gdncheck.redzone", "gdncheck.edges"]),
    ("oracle and metrics", ["gdncheck.oracle", "gdncheck.api_calls", "gdncheck.metrics"]),
    ("judge", ["gdncheck.judge"]),
    ("backends", ["gdncheck.backends"]),
    # case generation for a backend (its declared capabilities and API) sits above the backends
    ("execution", ["gdncheck.execute", "gdncheck.sanitize", "gdncheck.shard", "gdncheck.strategies",
                   "gdncheck.api_suite"]),
    ("workflows", ["gdncheck.run", "gdncheck.engine_parity", "gdncheck.findings", "gdncheck.api_coverage", "gdncheck.gate", "gdncheck.fuzz", "gdncheck.repro",
                   "gdncheck.ablate",
                   "gdncheck.drift", "gdncheck.bench", "gdncheck.explain"]),
    ("rendering", ["gdncheck.report"]),
    ("cli", ["gdncheck.cli", "gdncheck.__main__"]),
]


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _rank(mod: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{mod} belongs to no layer: add it to LAYERS"
    return rank


def _imports() -> dict[str, set[str]]:
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    out = {}
    for mod, path in mods.items():
        deps = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for blk in ast.walk(tree) if isinstance(blk, ast.If)
                       and getattr(blk.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(blk)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: not an import at run time
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n.startswith("gdncheck") and n != mod:
                    deps.add(n)
        out[mod] = deps
    return out


def test_imports_follow_the_layers():
    bad = [f"{m} ({LAYERS[_rank(m)][0]}) imports {d} ({LAYERS[_rank(d)][0]})"
           for m, deps in _imports().items() for d in sorted(deps)
           if d != "gdncheck" and _rank(d) > _rank(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d == "gdncheck" or d.startswith(m + "."):
                continue  # a package's __init__ re-exporting its own modules is not a cycle
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cyc := visit(d)):
                return cyc
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cyc := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cyc))


def test_layers_catch_a_violation():
    """The check itself can fail: a schema importing the judge is reported."""
    assert _rank("gdncheck.judge") > _rank("gdncheck.data.case")
    assert _rank("gdncheck.report.render") > _rank("gdncheck.run") > _rank("gdncheck.execute")


def test_scripts_import_what_the_package_has():
    """Every ``from gdncheck... import name`` in ``scripts/`` names a module and an attribute that
    exist (scripts are not imported by the tests otherwise, so a moved function would go unnoticed)."""
    import importlib
    import importlib.util

    bad = []
    for path in sorted((PKG.parent / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gdncheck":
                try:
                    mod = importlib.import_module(node.module)
                except ImportError as e:
                    bad.append(f"{path.name}: {node.module}: {e}")
                    continue
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                        if not hasattr(mod, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not bad, bad
