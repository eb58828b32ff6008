"""gdncheck: numerical verification and fuzzing for Gated Delta Rule kernels."""
__version__ = "0.1.0"
