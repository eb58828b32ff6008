"""Hypothesis profiles: ``dev`` (default), ``ci`` (derandomized, no example database; loaded
when the ``CI`` environment variable is set) and ``nightly`` (many more examples; select it
with ``pytest --hypothesis-profile=nightly``)."""
import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_common)
settings.register_profile("nightly", max_examples=1000, **_common)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# The profiles' single source is gdncheck.strategies (same names; GDNCHECK_PROFILE, else CI, else dev).
from gdncheck.strategies import load_profile  # noqa: E402

load_profile()


# pytest-xdist on a multi-GPU host: worker gwK runs on GPU K % n. Set before torch initialises
# CUDA (pytest_configure runs in each worker before collection); GDNCHECK_NO_GPU_MAP=1 opts out.
def pytest_configure(config):
    wid = os.environ.get("PYTEST_XDIST_WORKER")
    if not wid or os.environ.get("GDNCHECK_NO_GPU_MAP"):
        return
    from gdncheck.gate import gpu_for_worker, visible_gpus

    gpu = gpu_for_worker(wid, visible_gpus())
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
