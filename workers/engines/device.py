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
    """The weights' dtype; ``auto``: bfloat16 on CUDA and on a CPU with AMX, float32 on
    other CPUs."""
    import torch

    name = settings.torch_dtype
    if name == "auto":
        name = "bfloat16" if on == "cuda" or amx() else "float32"
    result = getattr(torch, name)
    assert isinstance(result, torch.dtype)
    return result


def amx() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX: Xeon Sapphire
    Rapids and newer). There bfloat16 runs faster than float32; on other CPUs slower,
    AVX512-BF16 alone included."""
    import torch

    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    enabled = getattr(torch.cpu, "_init_amx", None)  # asks Linux to let this process use it
    return bool(supported and enabled and supported() and enabled())
