"""``kontext bench-embeddings``: the embedding model alone, in float32 and in bfloat16,
over real chat lines (the chitchat-dataset wheel): each text's wall and CPU time at a few
batch sizes, and how close each dtype's vectors are to float32's of the text embedded
alone. What ``KONTEXT_TORCH_DTYPE=auto`` should pick on a machine is the faster dtype."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kontext.bench.turns import dataset_path, dialogue_lines, precision
from kontext.settings import Settings
from workers.embeddings import MiniLMEmbedder
from workers.engines.device import amx

DTYPES = ("float32", "bfloat16")


@dataclass
class Row:
    dtype: str
    batch_size: int
    wall_ms: float
    """Per text."""
    cpu_ms: float
    """Per text, this process's CPU time (every thread)."""
    cosine_min: float
    """Against float32's vector of the same text embedded alone."""
    cosine_mean: float


def chat_lines(count: int, path: Path | None = None) -> list[str]:
    """The dataset's first ``count`` lines, in conversation order."""
    lines = itertools.chain.from_iterable(dialogue_lines(path or dataset_path()))
    found = list(itertools.islice(lines, count))
    if len(found) < count:
        raise ValueError(f"the dataset has only {len(found)} lines")
    return found


def measure(
    texts: Sequence[str], batch_sizes: Sequence[int], advance: Callable[[int], None]
) -> list[Row]:
    """Each dtype at each batch size, one pass over ``texts`` (after one warm-up call).
    ``advance`` is told how many texts each call embedded."""
    import torch

    rows: list[Row] = []
    reference: np.ndarray | None = None
    for name in DTYPES:
        model = MiniLMEmbedder(dtype=getattr(torch, name))
        if reference is None:
            reference = np.concatenate([model.embed_sync([text]) for text in texts])
        model.embed_sync(texts[: max(batch_sizes)])
        for size in batch_sizes:
            parts = []
            wall, cpu = time.perf_counter(), time.process_time()
            for start in range(0, len(texts), size):
                parts.append(model.embed_sync(texts[start : start + size]))
                advance(len(parts[-1]))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            cosines = np.einsum("ij,ij->i", np.concatenate(parts), reference)
            rows.append(
                Row(
                    name,
                    size,
                    wall * 1000 / len(texts),
                    cpu * 1000 / len(texts),
                    float(cosines.min()),
                    float(cosines.mean()),
                )
            )
    return rows


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| dtype | batch size | wall ms per text | CPU ms per text "
        "| cosine to float32 alone: min, mean |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.dtype} | {r.batch_size} | {r.wall_ms:.2f} | {r.cpu_ms:.2f} "
        f"| {r.cosine_min:.5f}, {r.cosine_mean:.5f} |"
        for r in rows
    ]
    return "\n".join(lines)


def setup(texts: int, batch_sizes: str) -> str:
    """The section's line beside the machine: the CPU's AMX, what ``auto`` picks here,
    torch's threads and any instruction-set cap on oneDNN."""
    import torch

    auto = precision(Settings(device="cpu"))
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (
        f"Model all-MiniLM-L6-v2 on cpu, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; AMX {'yes' if amx() else 'no'}, so "
        f"`KONTEXT_TORCH_DTYPE=auto` picks {auto} here"
        + (f"; oneDNN held to `ONEDNN_MAX_CPU_ISA={cap}`" if cap else "")
        + f"; {texts} chitchat-dataset 0.9.0 lines. Command: "
        f"`kontext bench-embeddings --texts {texts} --batch-sizes {batch_sizes}`."
    )
