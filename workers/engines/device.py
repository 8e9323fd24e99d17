"""Where the transformers models run: ``KONTEXT_DEVICE`` resolved against this machine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kontext.settings import Settings

if TYPE_CHECKING:
    import torch


def device(settings: Settings) -> str:
    """``cuda`` or ``cpu``; ``auto`` picks CUDA when torch sees a GPU."""
    import torch

    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("KONTEXT_DEVICE=cuda, but torch sees no CUDA GPU on this machine")
    return settings.device


def dtype(settings: Settings, on: str) -> torch.dtype:
    """The weights' dtype; ``auto``: float32 on CPU, bfloat16 on CUDA."""
    import torch

    name = settings.torch_dtype
    if name == "auto":
        name = "bfloat16" if on == "cuda" else "float32"
    result = getattr(torch, name)
    assert isinstance(result, torch.dtype)
    return result
