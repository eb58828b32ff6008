"""Backend registry: built-in adapters by name, plugins by ``package.module:factory`` or entry point.

A plugin factory is any callable returning a :class:`Backend`; packages can also publish one
under the entry-point group ``gdncheck.backends``.
"""
from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points

from gdncheck.backends.base import Backend, Capabilities, Outputs
from gdncheck.data.errors import UsageError

__all__ = ["Backend", "Capabilities", "Outputs", "BUILTIN", "BackendNotFound", "load_backend",
           "known_backends", "default_backends"]

# name -> "module:factory"; imported lazily so a missing kernel package costs nothing.
BUILTIN: dict[str, str] = {
    # every public GDN entry point of FlashInfer on SM90 (api_spec.py); version-aware
    "flashinfer-prefill-args": "gdncheck.backends.flashinfer_api:FlashInferPrefillArgs",
    "flashinfer-prefill-paged": "gdncheck.backends.flashinfer_api:FlashInferPrefillPaged",
    "flashinfer-decode-paged": "gdncheck.backends.flashinfer_api:FlashInferDecodePaged",
    "flashinfer-decode-vlast": "gdncheck.backends.flashinfer_api:FlashInferDecodeVLast",
    "flashinfer-cake-mtp": "gdncheck.backends.flashinfer_api:FlashInferCakeMTP",
    "twin-fla": "gdncheck.backends.twins:FLATwin",
    "twin-flashinfer": "gdncheck.backends.twins:FlashInferTwin",
    "fla-interp": "gdncheck.backends.fla:FLAInterpreter",
    "fla-chunk": "gdncheck.backends.fla:FLAChunk",
    "fla-recurrent": "gdncheck.backends.fla:FLARecurrent",
    "flashinfer-prefill": "gdncheck.backends.flashinfer:FlashInferPrefill",
    "flashinfer-decode": "gdncheck.backends.flashinfer:FlashInferDecode",
    "flashinfer-prefill-cp": "gdncheck.backends.flashinfer:prefill_cp",
    "flashinfer-prefill-chunk": "gdncheck.backends.flashinfer:prefill_chunk",
    "flashinfer-mtp": "gdncheck.backends.flashinfer:FlashInferMTP",
    "flashinfer-mtp-ssm": "gdncheck.backends.flashinfer:mtp_ssm",
    "twin-fla-beta-bf16": "gdncheck.backends.sglang:twin_beta_bf16",
    "sglang-decode": "gdncheck.backends.sglang:SGLangPackedDecode",
    "sglang-fused-sigmoid": "gdncheck.backends.sglang:SGLangFusedSigmoid",
    "sglang-extend": "gdncheck.backends.sglang:SGLangExtend",
    "sglang-decode-interp": "gdncheck.backends.sglang:SGLangPackedDecodeInterp",
    "sglang-fused-sigmoid-interp": "gdncheck.backends.sglang:SGLangFusedSigmoidInterp",
    "sglang-extend-interp": "gdncheck.backends.sglang:SGLangExtendInterp",
    "sglang-flashinfer-decode": "gdncheck.backends.engine_flashinfer:SGLangFlashInferDecode",
    "sglang-flashinfer-extend": "gdncheck.backends.engine_flashinfer:SGLangFlashInferExtend",
    "sglang-flashinfer-verify": "gdncheck.backends.engine_flashinfer:SGLangFlashInferVerify",
    "vllm-flashinfer-prefill": "gdncheck.backends.engine_flashinfer:VLLMFlashInferPrefill",
    "vllm-decode": "gdncheck.backends.vllm:VLLMPackedDecode",
    "vllm-fused-sigmoid": "gdncheck.backends.vllm:VLLMFusedSigmoid",
    "vllm-chunk": "gdncheck.backends.vllm:VLLMChunk",
    "vllm-decode-interp": "gdncheck.backends.vllm:VLLMPackedDecodeInterp",
    "vllm-fused-sigmoid-interp": "gdncheck.backends.vllm:VLLMFusedSigmoidInterp",
    "vllm-chunk-interp": "gdncheck.backends.vllm:VLLMChunkInterp",
}


class BackendNotFound(UsageError):
    """Unknown backend name, or a plugin spec that does not load or does not make a Backend."""


def _plugins() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group="gdncheck.backends")}


def known_backends() -> list[str]:
    """Registry and entry-point names (planted faults load as ``fault-<name>``)."""
    return sorted(set(BUILTIN) | set(_plugins()))


def load_backend(spec: str) -> Backend:
    """A backend by registry name, entry-point name, or ``package.module:factory``."""
    target = BUILTIN.get(spec)
    if target is None and spec.startswith("fault-"):
        from gdncheck.backends.faults import FAULTS

        name = spec.removeprefix("fault-")
        if name not in FAULTS:
            raise BackendNotFound(f"unknown planted fault {spec!r}; known: "
                                  + ", ".join(f"fault-{n}" for n in sorted(FAULTS)))
        return FAULTS[name]()
    if target is None and spec in _plugins():
        factory = _plugins()[spec].load()
    else:
        target = target or spec
        if ":" not in target:
            raise BackendNotFound(f"unknown backend {spec!r}; known: {', '.join(known_backends())}, "
                                  "or give package.module:factory")
        mod, _, attr = target.partition(":")
        if os.getcwd() not in sys.path:  # a plugin in the working directory, as `python -m` finds it
            sys.path.append(os.getcwd())
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except Exception as e:  # noqa: BLE001 - any failure to import a plugin is the user's to fix
            raise BackendNotFound(f"backend {spec!r}: cannot load {target}: {type(e).__name__}: {e}") from None
    if not callable(factory):
        raise BackendNotFound(f"backend {spec!r}: {type(factory).__name__} object is not a factory")
    try:
        backend = factory()
    except Exception as e:  # noqa: BLE001 - a plugin factory that raises is a configuration error
        raise BackendNotFound(f"backend {spec!r}: its factory raised {type(e).__name__}: {e}") from None
    if not isinstance(backend, Backend):
        raise BackendNotFound(f"backend {spec!r}: factory returned {type(backend).__name__}, not a "
                              "gdncheck.backends.Backend")
    return backend


def default_backends(gpu: bool) -> list[str]:
    """Backends ``gdncheck run`` uses when none are named."""
    if gpu:
        return ["twin-fla", "twin-flashinfer", "fla-chunk", "fla-recurrent", "flashinfer-prefill",
                "flashinfer-prefill-cp", "flashinfer-prefill-chunk", "flashinfer-decode",
                "flashinfer-mtp", "flashinfer-mtp-ssm"]
    return ["twin-fla", "twin-flashinfer", "fla-interp"]
