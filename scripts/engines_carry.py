"""Copy the engines' GDN kernel sources (and their version metadata) into a small folder that a GPU
machine without internet can put on ``PYTHONPATH``: ``scripts/engines_carry.sh`` calls this.

What is copied, per engine, from the installed packages (Python sources only, no compiled
extensions): every module that loading the GDN kernel modules through
``gdncheck.backends.engines`` imports (recorded in a subprocess, on this machine), the whole
package folders those modules live in (a GPU takes other branches of the same files), and the
dist-info's ``METADATA`` (so ``importlib.metadata.version`` reports the engine's version).
With ``--deps PYVER`` (the GPU image's Python, default 3.12) it also unpacks the wheels of the
small packages vLLM's modules import (``DEPS``) built for that Python, for an image without them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

MODULES = {
    "sglang": ["fla.fused_recurrent", "linear.fused_sigmoid_gating_recurrent", "linear.fused_gdn_gating", "fla.chunk"],
    "vllm": ["fused_recurrent", "fused_sigmoid_gating", "fused_gdn_prefill_post_conv", "chunk", "index"],
}
DEPS = ["regex", "psutil", "pyzmq", "urllib3"]
_PROBE = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
from gdncheck.backends import engines
pkg = sys.argv[1]
for m in json.loads(sys.argv[2]):
    engines.load(pkg, m)
print(json.dumps(sorted({getattr(m, "__file__", None) or "" for k, m in sys.modules.items()
                         if k == pkg or k.startswith(pkg + ".")} - {""})))
"""


def carry(pkg: str, dest: Path) -> int:
    dist = distribution(pkg)
    site = Path(str(dist.locate_file("")))
    out = subprocess.run([sys.executable, "-c", _PROBE, pkg, json.dumps(MODULES[pkg])], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    files = {Path(f) for f in json.loads(out)}
    dirs = {f.parent for f in files}
    for d in sorted(dirs):
        files |= set(d.glob("*.py"))
    n = 0
    for f in sorted(files):
        rel = f.relative_to(site)
        if rel.parts[0] != pkg:
            continue
        if pkg == "sglang" and rel.name == "__init__.py" and len(rel.parts) <= 5:
            continue  # the loader shells SGLang's parent packages: their __init__ pulls the server stack
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest / rel)
        n += 1
    meta = dest / f"{dist.metadata['Name']}-{dist.version}.dist-info"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.metadata['Name']}\nVersion: {dist.version}\n")
    return n


def deps(dest: Path, pyver: str) -> None:
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", pyver, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                        "-d", tmp, *DEPS], check=True)
        for w in sorted(Path(tmp).glob("*.whl")):
            zipfile.ZipFile(w).extractall(dest / "deps")
            print(f"deps: {w.name}")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", nargs="?", default=".engines")
    ap.add_argument("--deps", metavar="PYVER", default="3.12", help="Python of the GPU image ('' = none)")
    a = ap.parse_args()
    dest = Path(a.dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for pkg in MODULES:
        print(f"{pkg}: {carry(pkg, dest)} files")
    if a.deps:
        deps(dest, a.deps)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
