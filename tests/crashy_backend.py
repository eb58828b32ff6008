"""Test-only plugin backends for the runner: one that kills its process, one that raises."""
import os

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


def crashy() -> Crashy:
    return Crashy()
