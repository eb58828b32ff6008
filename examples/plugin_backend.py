"""A plugin backend: gate a kernel that is not released yet.

    gdncheck run --backend examples.plugin_backend:make --suite smoke --device cpu

Here the "kernel" is the oracle in fp32 with the output rounded to the input dtype; replace
``run`` with a call into your kernel. Publish it to every gdncheck command with an entry point:
``[project.entry-points."gdncheck.backends"] my-kernel = "my_pkg.gdn:make"``.
"""
from gdncheck.backends import Backend, Capabilities, Outputs
from gdncheck.oracle import expected


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
        inputs.out.copy_(exp.o.to(inputs.out.dtype))                  # write the poisoned buffer
        inputs.state.copy_(exp.pool.to(inputs.state.dtype))           # pool / final state in place
        inter = None if exp.intermediate is None else exp.intermediate.float()
        return Outputs(o=inputs.out, state=inputs.state, intermediate=inter, path="my-kernel")


def make() -> MyKernel:
    return MyKernel()
