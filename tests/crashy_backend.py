"""Test-only plugin backends for the runner (one that kills its process, one that raises) and a
small suite builder shared by the runner and gate tests."""
import os
from pathlib import Path

from gdncheck.backends import Backend, Capabilities, Outputs
from gdncheck.oracle import expected


class Exact(Backend):
    """The oracle rounded to the kernel dtypes: a backend that is right by construction."""

    name = "test-exact"
    caps = Capabilities()

    def run(self, inputs) -> Outputs:
        exp = expected(inputs, self.policy(inputs.case), self.zero_length_policy)
        inputs.out.copy_(exp.o.to(inputs.out.dtype))
        inputs.state.copy_(exp.pool.to(inputs.state.dtype))
        inter = None if exp.intermediate is None else exp.intermediate.float()
        return Outputs(o=inputs.out, state=inputs.state, intermediate=inter, path="exact")


class Crashy(Exact):
    """Dies like a device fault (the whole process goes) on decode cases with an odd seed."""

    name = "test-crashy"

    def run(self, inputs) -> Outputs:
        c = inputs.case
        if c.op == "decode" and c.seed % 2 == 1:
            os._exit(77)
        if c.op == "verify":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return super().run(inputs)


def exact() -> Exact:
    return Exact()


class Absent(Exact):
    """A backend whose package is missing: every case is unsupported for that reason."""

    name = "test-absent"

    def available(self):
        return "test-absent: package not installed (simulated)"


def absent() -> Absent:
    return Absent()


class Locked(Exact):
    """Builds its kernels under one lock shared by all processes (as FlashInfer's CuTe DSL modules do)."""

    name = "test-locked"

    def compile_lock(self, case):
        return "test-lock"

    def run(self, inputs) -> Outputs:
        import time

        time.sleep(0.2)  # long enough that lanes taking these units side by side would overlap
        return super().run(inputs)


def locked() -> Locked:
    return Locked()


def crashy() -> Crashy:
    return Crashy()


def mini_suite(tmp_path: Path, seeds=(1, 2)) -> Path:
    """A suite TOML of three small cases per seed (padded decode pool, varlen prefill with a
    zero-length sequence, verify with intermediate states), written to ``tmp_path/mini.toml``."""
    lines = ["[defaults]", "H = 2", "HV = 4", "K = 16", "V = 16"]
    for s in seeds:
        lines += ["[[case]]", 'op = "decode"', "seqlens = [1, 1, 1]", "pool_size = 6",
                  "read_indices = [4, -1, 2]", f"seed = {s}"]
        lines += ["[[case]]", 'op = "prefill"', "seqlens = [5, 0, 9]", f"seed = {s}"]
        lines += ["[[case]]", 'op = "verify"', "seqlens = [3, 3]", "pool_size = 4",
                  "read_indices = [1, 3]", "intermediate = true", f"seed = {s}"]
    p = tmp_path / "mini.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


class Hungry(Exact):
    """Raises CUDA's out-of-memory text on the first prefill case of a run (a flag file named by
    ``GDNCHECK_TEST_HUNGRY_FIRST`` marks it) and computes every later one, like a case that did
    not fit beside other workers and fits alone."""

    name = "test-hungry"

    def run(self, inputs) -> Outputs:
        if inputs.case.op == "prefill" and os.environ.get("GDNCHECK_TEST_HUNGRY_FIRST"):
            flag = Path(os.environ["GDNCHECK_TEST_HUNGRY_FIRST"])
            if not flag.exists():
                flag.write_text("1")
                raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB (simulated)")
        return super().run(inputs)


def hungry() -> Hungry:
    return Hungry()
