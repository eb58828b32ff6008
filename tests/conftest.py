"""Test setup: Hypothesis profiles and, on multi-GPU hosts, one GPU per xdist worker.

Profiles (``dev``, ``ci``, ``nightly``) are defined once in :mod:`gdncheck.strategies`;
``GDNCHECK_PROFILE`` picks one, else ``ci`` under ``$CI``, else ``dev``. ``pytest
--hypothesis-profile=nightly`` works as well.
"""
import os

import pytest

from gdncheck.strategies import load_profile

load_profile()


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """xdist runs one worker per core; intra-op threads on top oversubscribe the cores, and
    OpenMP's spin-waits then slowed the small-tensor tests ~10x on a loaded 2-core machine.
    Subprocesses (worker isolation, --gpus fan-out) inherit the setting, so their float64
    reductions split like the parent's and results compare bit for bit."""
    import torch

    n, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(n)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


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
