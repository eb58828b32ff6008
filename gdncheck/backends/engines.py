"""Load the serving engines' own GDN kernel modules (SGLang, vLLM) without the engines around them.

SGLang's package ``__init__`` pulls in a web-server stack and its kernel modules take a few device
probes from ``sglang.srt.utils``; vLLM's Triton ops import only light modules (``vllm.triton_utils``,
``vllm.platforms``, never ``vllm._C``). The loader therefore

- SGLang: puts *shell* packages (a module with only ``__path__``) in ``sys.modules`` for the
  parents of ``sglang.kernels.ops.attention.{fla,linear}`` and stubs the few probes those modules
  import (``is_cuda``, ``get_device_sm``, ``is_arch_support_pdl``, ...) with equivalents computed
  from torch; the kernel files themselves are the installed ones, unmodified. A process that had
  already imported the real ``sglang`` keeps it.
- vLLM: imports ``vllm.third_party.flash_linear_attention.ops`` normally, with
  ``vllm.platforms.current_platform`` set to a stub answering the ops' device probes from torch
  (vLLM's CUDA platform would import its 90 MB compiled extension for them). On a machine
  without a CUDA driver it hides the devices while vLLM probes its Triton drivers (else vLLM
  swaps Triton for placeholders); under the interpreter it forces the first autotune config
  (``VLLM_TRITON_FORCE_FIRST_CONFIG``).

A moved package layout fails with one line naming the missing module path
(:class:`EngineUnavailable`). Under ``TRITON_INTERPRET=1`` the interpreter fixes of
:func:`interpreter_fixes` are applied to the loaded modules only (installed files are never
edited); on CUDA nothing is patched.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _pkg_version
from pathlib import Path

import torch

ENGINE_PINS = {"sglang": "0.5.23", "vllm": "0.33.0"}
SGLANG_OPS = "sglang.kernels.ops.attention"
VLLM_OPS = "vllm.third_party.flash_linear_attention.ops"
_SHELL = "__gdncheck_shell__"


class EngineUnavailable(ImportError):
    """An engine's kernel module cannot be loaded here; the message is one line."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def engine_version(pkg: str) -> str:
    """Installed version of ``pkg`` from its dist-info (found on ``sys.path``, so a carried copy
    with its dist-info reports too), or ``"not installed"``."""
    try:
        return _pkg_version(pkg)
    except PackageNotFoundError:
        return "not installed"


def install_hint(pkg: str) -> str:
    return f"pip install --no-deps {pkg}=={ENGINE_PINS[pkg]}"


def _root(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg) if pkg not in sys.modules else None
    if pkg in sys.modules:
        paths = list(getattr(sys.modules[pkg], "__path__", []))
    else:
        paths = list(spec.submodule_search_locations or []) if spec else []
    if not paths:
        raise EngineUnavailable(f"{pkg} is not installed ({install_hint(pkg)})")
    return Path(paths[0])


def _need_dir(pkg: str, root: Path, dotted: str) -> Path:
    d = root.joinpath(*dotted.split(".")[1:])
    if not d.is_dir():
        raise EngineUnavailable(f"{pkg} {engine_version(pkg)}: package layout moved: {dotted} "
                                f"({d}) not found; gdncheck's adapters follow {pkg} {ENGINE_PINS[pkg]}")
    return d


# ------------------------------------------------------------------------- SGLang

def _cuda_cap() -> tuple[int, int]:
    if torch.cuda.is_available() and torch.version.cuda:
        return torch.cuda.get_device_capability()
    return (0, 0)


def _sglang_stubs() -> dict[str, dict]:
    """Names SGLang's GDN kernel modules take from ``sglang.srt.utils`` and
    ``sglang.kernels.jit.utils``, answered from torch the way SGLang answers them on that device."""
    from packaging import version as _v

    cap = _cuda_cap()
    is_cuda = bool(torch.cuda.is_available() and torch.version.cuda)
    is_hip = bool(torch.version.hip)
    utils = dict(
        is_cuda=lambda: is_cuda, is_hip=lambda: is_hip, is_npu=lambda: False, is_xpu=lambda: False,
        is_cpu=lambda: False,  # the Triton kernels are what this loader is for, also under the interpreter
        is_musa=lambda: False,
        is_gfx95_supported=lambda: False,
        get_device_sm=lambda: cap[0] * 10 + cap[1],
        is_sm90_supported=lambda device=None: is_cuda and cap[0] >= 9,
        is_sm100_supported=lambda device=None: is_cuda and cap[0] == 10,
    )
    common = dict(utils, torch_release=_v.parse(torch.__version__).release)
    jit = dict(is_arch_support_pdl=lambda: is_cuda and cap[0] >= 9)
    return {"sglang.srt.utils": utils, "sglang.srt.utils.common": common, "sglang.kernels.jit.utils": jit}


def _shell(dotted: str, path: list[str]) -> types.ModuleType:
    """A package module with only a search path: its ``__init__`` never runs."""
    m = types.ModuleType(dotted)
    m.__spec__ = importlib.machinery.ModuleSpec(dotted, None, is_package=True)
    m.__spec__.submodule_search_locations = path
    m.__path__ = path
    setattr(m, _SHELL, True)
    return m


def _sglang_prepare() -> None:
    real = sys.modules.get("sglang")
    if real is not None and not getattr(real, _SHELL, False):
        return  # a real SGLang process: its own modules stand
    root = _root("sglang")
    for dotted in ("sglang", "sglang.kernels", "sglang.kernels.ops", SGLANG_OPS, f"{SGLANG_OPS}.fla",
                   f"{SGLANG_OPS}.linear"):
        if dotted in sys.modules:
            continue
        d = root if dotted == "sglang" else _need_dir("sglang", root, dotted)
        sys.modules[dotted] = _shell(dotted, [str(d)])
    for dotted in ("sglang.kernels.jit", "sglang.srt"):
        # parents of the stubbed probes only: a carried copy of the kernels (no server, no JIT
        # sources) has neither folder, and the kernel modules import nothing else below them
        d = root.joinpath(*dotted.split(".")[1:])
        if dotted not in sys.modules:
            sys.modules[dotted] = _shell(dotted, [str(d)] if d.is_dir() else [])
    for dotted, names in _sglang_stubs().items():
        if dotted in sys.modules:
            continue
        m = _shell(dotted, [])
        m.__dict__.update(names)
        sys.modules[dotted] = m


# --------------------------------------------------------------------------- vLLM

def _vllm_platform():
    """A ``vllm.platforms.interface.Platform`` answering the ops' device probes from torch.

    vLLM's own CUDA platform imports ``vllm._C_stable_libtorch`` (a 90 MB extension built for
    vLLM's torch pin) at import time just to exist; the GDN kernels never call into it."""
    from vllm.platforms import interface as itf

    cuda = bool(torch.cuda.is_available() and torch.version.cuda)
    cap = _cuda_cap()

    class GDNCheckPlatform(itf.Platform):
        _enum = itf.PlatformEnum.CUDA if cuda else itf.PlatformEnum.UNSPECIFIED
        device_name = "cuda" if cuda else "cpu"
        device_type = "cuda" if cuda else "cpu"

        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return itf.DeviceCapability(*cap) if cuda else None

        @classmethod
        def is_pin_memory_available(cls) -> bool:
            return cuda

        @classmethod
        def is_arch_support_pdl(cls) -> bool:
            return cuda and cap[0] >= 9

    return GDNCheckPlatform()


def _vllm_prepare() -> None:
    root = _root("vllm")
    _need_dir("vllm", root, VLLM_OPS)
    if VLLM_OPS in sys.modules:
        return
    os.environ.setdefault("VLLM_TRITON_FORCE_FIRST_CONFIG", "1" if interpreting() else "0")
    with _vllm_env():
        try:
            plat = importlib.import_module("vllm.platforms")
        except Exception as e:  # noqa: BLE001 - one line, like every loader failure
            raise EngineUnavailable(f"vllm {engine_version('vllm')}: cannot import vllm.platforms: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if getattr(plat, "_current_platform", None) is None:
            plat._current_platform = _vllm_platform()


@contextlib.contextmanager
def _vllm_env():
    """vLLM counts active Triton drivers when ``vllm.triton_utils`` is first imported and swaps
    Triton for placeholders unless there is exactly one; with no CUDA driver, an empty
    ``CUDA_VISIBLE_DEVICES`` makes it wait for one instead. Restored afterwards."""
    hide = not torch.cuda.is_available() and "vllm.triton_utils" not in sys.modules
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hide:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if hide:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved


# ---------------------------------------------------------------------- public

_FIXED: set[str] = set()


def load(pkg: str, module: str) -> types.ModuleType:
    """The engine's kernel module ``module`` (relative to its ops package: SGLang
    ``sglang.kernels.ops.attention``, vLLM ``vllm.third_party.flash_linear_attention.ops``).

    Raises :class:`EngineUnavailable` with one line when the package is missing, its layout moved,
    or the module does not import; applies :func:`interpreter_fixes` under ``TRITON_INTERPRET=1``.
    """
    base = {"sglang": SGLANG_OPS, "vllm": VLLM_OPS}[pkg]
    full = f"{base}.{module}"
    if pkg == "sglang":
        _sglang_prepare()
    else:
        _vllm_prepare()
    try:
        with _vllm_env() if pkg == "vllm" else contextlib.nullcontext():
            try:
                spec = importlib.util.find_spec(full)
            except ModuleNotFoundError:  # a parent package is gone
                spec = None
            if spec is None:
                raise EngineUnavailable(f"{pkg} {engine_version(pkg)}: package layout moved: {full} not found; "
                                        f"gdncheck's adapters follow {pkg} {ENGINE_PINS[pkg]}")
            mod = importlib.import_module(full)
    except EngineUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - any import failure is one line
        msg = str(e).splitlines()[0] if str(e) else ""
        raise EngineUnavailable(f"{pkg} {engine_version(pkg)}: cannot import {full}: "
                                f"{type(e).__name__}: {msg}") from None
    if interpreting():
        interpreter_fixes(pkg)
    return mod


def problem(pkg: str, modules: list[str]) -> str | None:
    """Why ``modules`` of ``pkg`` cannot be loaded here (one line), or None."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable: {e}"
    try:
        for m in modules:
            load(pkg, m)
    except EngineUnavailable as e:
        return str(e)
    return None


# -------------------------------------------------------- interpreter fixes

def interpreter_fixes(pkg: str) -> list[str]:
    """Patch the loaded kernel modules of ``pkg`` for Triton's CPU interpreter; returns what it did.

    Only under ``TRITON_INTERPRET=1``, only on modules already in ``sys.modules`` under the
    engine's ops package, idempotent. The fixes (Triton 3.6 interpreter):

    - module-level aliases of Triton builtins (``exp = tl.exp`` in ``op.py`` and every module that
      imported them): the interpreter patches ``tl.*`` only when reached through the module
      ``tl``, so an alias called from a kernel misses its builder; aliases become ``@triton.jit``
      wrappers;
    - autotuners with several configs benchmark on a device ("0 active drivers"): keep the first;
    - ``for i_t in range(NT)`` then ``i_t.to(tl.int64)`` (``chunk_delta_h``): the interpreter's loop
      variable is a Python int; that module's ``range`` yields scalar tensors instead;
    - FLA's device-context helper (``custom_device_ctx``) enters ``torch.cuda.device``: a no-op
      context on the CPU;
    - ``tl.dot`` on bf16 operands: the interpreter stores bf16 as uint16 and multiplies the raw
      bit patterns; the operands are widened to fp32 first (exact). This one is the interpreter's
      own builder, so it holds for every interpreted kernel of the process (:func:`fix_bf16_dot`).
    """
    if not interpreting():
        return []
    import triton
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    from gdncheck.backends import _interp_ops as ops

    fix_bf16_dot()
    base = {"sglang": SGLANG_OPS, "vllm": VLLM_OPS}[pkg]
    wrappers = {id(getattr(triton.language, n)): getattr(ops, n)
                for n in ops.WRAPPED if hasattr(triton.language, n)}
    done: list[str] = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith(base + ".") or mod is None or name in _FIXED:
            continue
        for attr, val in list(vars(mod).items()):
            if id(val) in wrappers and not attr.startswith("__"):
                setattr(mod, attr, wrappers[id(val)])
                done.append(f"{name}.{attr}: tl alias -> jit wrapper")
            else:
                fn, depth = val, 0
                while isinstance(fn, KernelInterface) and depth < 4:  # heuristics / autotune nest via .fn
                    if isinstance(fn, Autotuner) and len(fn.configs) > 1:
                        fn.configs = fn.configs[:1]
                        done.append(f"{name}.{attr}: first autotune config")
                    fn, depth = getattr(fn, "fn", None), depth + 1
        if name.rpartition(".")[2] == "chunk_delta_h" and "range" not in vars(mod):
            mod.range = ops.tensor_range
            done.append(f"{name}.range: loop variable as a tensor")
        if hasattr(mod, "custom_device_ctx") and not torch.cuda.is_available():
            mod.custom_device_ctx = lambda index: contextlib.nullcontext()
            done.append(f"{name}.custom_device_ctx: no-op on the CPU")
        _FIXED.add(name)
    return done


def fix_bf16_dot() -> bool:
    """Widen bf16 ``tl.dot`` operands to fp32 in Triton's interpreter (idempotent; True if patched
    now). Under ``TRITON_INTERPRET=1`` only."""
    if not interpreting():
        return False
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as itp

    builder = itp.InterpreterBuilder
    if getattr(builder.create_dot, "_gdncheck_bf16", False):
        return False
    orig = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            widen = lambda h: itp.TensorHandle(  # noqa: E731
                itp._convert_float(h.data, h.dtype, tl.float32, None).view(np.float32), tl.float32) \
                if h.dtype == tl.bfloat16 else h
            a, b = widen(a), widen(b)
        return orig(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._gdncheck_bf16 = True
    builder.create_dot = create_dot
    return True


# ------------------------------------------------------------------ backend base

from gdncheck.backends.base import Backend  # noqa: E402
from gdncheck.data.case import Case  # noqa: E402


class EngineBackend(Backend):
    """Base of the SGLang / vLLM adapters: one engine package, the kernel modules one path needs.

    ``interp = True`` variants run on the CPU under ``TRITON_INTERPRET=1`` (set by
    :meth:`available`, refused where the engine's modules were already built without it) and cap
    K, V at :attr:`MAX_INTERP_DIM`; the others run on CUDA and refuse an interpreting process.
    """

    pkg: str = "sglang"
    modules: tuple[str, ...] = ()
    interp: bool = False
    MAX_INTERP_DIM = 64
    compile_hint_s = 5.0

    def version(self) -> str:
        return engine_version(self.pkg)

    def available(self) -> str | None:
        base = {"sglang": SGLANG_OPS, "vllm": VLLM_OPS}[self.pkg]
        if self.interp:
            if any(k.startswith(base) for k in sys.modules) and not interpreting():
                return f"{self.pkg}'s kernels were loaded in this process without TRITON_INTERPRET=1"
            os.environ["TRITON_INTERPRET"] = "1"
        elif interpreting():
            return "TRITON_INTERPRET=1 is set in this process (Triton would interpret, not compile)"
        why = problem(self.pkg, list(self.modules))
        if why:
            return why
        if not self.interp and not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def mod(self, name: str) -> types.ModuleType:
        return load(self.pkg, name)

    @staticmethod
    def packed_qkv(inputs) -> torch.Tensor:
        """q, k, v as the engines' conv output: ``[rows, 2*H*K + HV*V]``, rows = B (decode) or T
        (packed prefill), in q's dtype."""
        c = inputs.case
        rows = c.T if c.op == "prefill" else c.B
        return torch.cat([inputs.q.reshape(rows, c.H * c.K), inputs.k.reshape(rows, c.H * c.K),
                          inputs.v.reshape(rows, c.HS * c.V)], dim=-1)

    def supports(self, case: Case) -> str | None:
        why = super().supports(case)
        if why:
            return why
        if case.HV % case.H:
            return f"{self.name} needs HV divisible by H (GVA), got H={case.H}, HV={case.HV}"
        if case.K > 256 or case.V > 256:
            return f"{self.name}: K, V <= 256 (one block along K)"
        if self.interp and (case.K > self.MAX_INTERP_DIM or case.V > self.MAX_INTERP_DIM):
            return f"{self.name}: K, V <= {self.MAX_INTERP_DIM} under the interpreter (too slow beyond)"
        return None

    def compile_key(self, case: Case) -> tuple:
        """The recurrent kernels specialise on heads, dims, dtypes and flags, not on T or N
        (``do_not_specialize``), so cases differing only there reuse the compiled kernel."""
        return (self.name, case.op, case.H, case.HV, case.K, case.V, case.dtype, case.gate_dtype,
                case.state_dtype, case.l2norm, case.intermediate, case.disable_state_update)

    def schedule_key(self, case: Case) -> tuple:
        return (self.name, case.H, case.HV, case.K, case.V, case.dtype, case.state_dtype)


def interp_variant(base: type[EngineBackend], note: str = "") -> type[EngineBackend]:
    """``base`` under Triton's CPU interpreter (CI): named ``<base.name>-interp``, ``interp = True``,
    its capabilities with ``device = "cpu"``. ``note`` ends the docstring (e.g. which fixes apply)."""
    name = f"{base.__name__}Interp"
    return type(name, (base,), {
        "__doc__": f"``{base.name}`` under Triton's CPU interpreter (CI){note}.",
        "__module__": base.__module__, "__qualname__": name,
        "name": f"{base.name}-interp", "interp": True, "caps": base.caps.model_copy(update={"device": "cpu"})})
