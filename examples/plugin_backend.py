"""A plugin backend: gate a kernel that is not released yet.

    gdncheck run --backend examples.plugin_backend:make --suite smoke --device cpu

Here the "kernel" is the oracle in fp32 with the output rounded to the input dtype; replace
``run`` with a call into your kernel. Publish it to every gdncheck command with an entry point:
``[project.entry-points."gdncheck.backends"] my-kernel = "my_pkg.gdn:make"``.
"""
import torch

from gdncheck.backends import Backend, Capabilities, Outputs
from gdncheck.oracle import expected
from gdncheck_reference import OUT_CALLER, ROW_WRITTEN


class MyKernel(Backend):
    name = "my-kernel"
    family = "custom"
    caps = Capabilities(ops={"prefill", "decode", "verify"}, padding={"skip", "caller_value"})
    padding_policy = {"prefill": "skip", "decode": "skip", "verify": "caller_value"}
    twin = "twin-fla"  # the precision twin whose error is this kernel's budget unit

    def version(self) -> str:
        return "0.0.1-dev"

    def run(self, inputs) -> Outputs:
        exp = expected(inputs, self.policy(inputs.case), self.zero_length_policy)
        # write the tokens the call owns; padded rows under caller_value keep the caller's buffer
        mine = (exp.o_class != OUT_CALLER).to(inputs.out.device)[..., None, None]
        inputs.out.copy_(torch.where(mine, exp.o.to(inputs.out.dtype), inputs.out))
        rows = (exp.row_class == ROW_WRITTEN).nonzero().flatten().to(inputs.state.device)
        inputs.state[rows] = exp.pool[rows].to(inputs.state.dtype)    # only the pool rows the call writes
        inter = None if exp.intermediate is None else exp.intermediate.float()
        return Outputs(o=inputs.out, state=inputs.state, intermediate=inter, path="my-kernel")


def make() -> MyKernel:
    return MyKernel()
