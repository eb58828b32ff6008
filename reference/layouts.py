"""State layouts.

``v_last``: ``[.., HV, K, V]`` (FLA default). ``k_last``: ``[.., HV, V, K]`` (FlashInfer).
One is the other with the last two dims swapped.
"""
from __future__ import annotations

import torch

LAYOUTS = ("v_last", "k_last")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}")


def to_v_last(state: torch.Tensor, layout: str) -> torch.Tensor:
    """State in ``layout`` -> ``v_last`` (a view when it is a swap)."""
    check_layout(layout)
    return state if layout == "v_last" else state.transpose(-1, -2)


def from_v_last(state: torch.Tensor, layout: str) -> torch.Tensor:
    """``v_last`` state -> ``layout`` (a view when it is a swap)."""
    check_layout(layout)
    return state if layout == "v_last" else state.transpose(-1, -2)


def convert(state: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Contiguous copy of ``state`` from layout ``src`` to ``dst``."""
    return from_v_last(to_v_last(state, src), dst).contiguous()
