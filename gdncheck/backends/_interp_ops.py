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


def tensor_range(*args):
    """``range`` for kernels run by the interpreter whose loop variable is used as a tensor
    (``i_t.to(tl.int64)`` in ``chunk_delta_h``): the compiler makes it a tensor, the interpreter a
    Python int. Yields int32 scalar tensors as the interpreter builds ``tl.program_id``."""
    import numpy as np
    from triton.runtime.interpreter import TensorHandle

    def as_int(a):
        return int(a.handle.data.item()) if hasattr(a, "handle") else int(a)

    for i in range(*map(as_int, args)):
        yield tl.core.tensor(TensorHandle(np.array([i], dtype=np.int32), tl.int32), tl.int32)
