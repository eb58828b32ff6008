"""``@triton.jit`` wrappers of Triton builtins, for engine modules that alias a builtin at module
level (``exp = tl.exp``): under ``TRITON_INTERPRET=1`` such an alias misses the interpreter's
builder, a jit function does not (see :func:`gdncheck.backends.engines.interpreter_fixes`)."""
import triton
import triton.language as tl

WRAPPED = ("exp", "exp2", "log", "log2", "sigmoid", "gather")


@triton.jit
def exp(x):
    return tl.exp(x)


@triton.jit
def exp2(x):
    return tl.exp2(x)


@triton.jit
def log(x):
    return tl.log(x)


@triton.jit
def log2(x):
    return tl.log2(x)


@triton.jit
def sigmoid(x):
    return tl.sigmoid(x)


@triton.jit
def gather(src, index, axis):
    return tl.gather(src, index, axis)
