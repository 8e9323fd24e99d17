"""The feature-hashing embedder (``KONTEXT_EMBEDDER=hash``): deterministic, unit-length,
never zeros, and closer for texts that share words."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from kontext.app.runtime import Runtime
from kontext.settings import DtypeName, Settings
from workers.embeddings import DIMENSIONS, SUB_BATCH, HashEmbedder, MiniLMEmbedder, load_embedder
from workers.engines.device import dtype

TEXTS = [
    "By the way, my locker code is 4821.",
    "What is my locker code?",
    "The weather in Lisbon was lovely today.",
    "🙂 …",
]


async def test_hash_vectors_are_unit_length_and_never_zeros() -> None:
    vectors = await HashEmbedder().embed(TEXTS)
    assert vectors.shape == (len(TEXTS), DIMENSIONS) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert vectors[3].any()  # a text without words still has a direction


async def test_shared_words_make_texts_closer() -> None:
    fact, question, weather, _ = await HashEmbedder().embed(TEXTS)
    assert float(fact @ question) > float(fact @ weather) + 0.2


def test_the_same_text_embeds_the_same_in_every_process() -> None:
    script = (
        "import sys; from workers.embeddings import HashEmbedder; "
        "sys.stdout.buffer.write(HashEmbedder().embed_sync([sys.argv[1]]).tobytes())"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", script, TEXTS[0]], capture_output=True, check=True
        ).stdout
        for _ in range(2)
    ]
    here = HashEmbedder().embed_sync([TEXTS[0]]).tobytes()
    assert runs[0] == runs[1] == here


def test_the_setting_chooses_the_embedder() -> None:
    assert Settings().embedder == "minilm"
    assert isinstance(load_embedder(Settings(embedder="hash").embedder), HashEmbedder)


LONG = " ".join(["a long rambling line about the weather"] * 60)  # past MAX_TOKENS
MIXED = [TEXTS[i % len(TEXTS)] if i % 7 else LONG for i in range(SUB_BATCH + 9)]
"""Texts of very different lengths, more than one sub-batch of them, not in length order."""


@pytest.fixture(scope="module")
def minilm() -> dict[torch.dtype, MiniLMEmbedder]:
    return {kind: MiniLMEmbedder(dtype=kind) for kind in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize(
    ("kind", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 4e-3)], ids=str
)
def test_minilm_gives_each_text_its_own_vector_whatever_the_batch_holds(
    minilm: dict[torch.dtype, MiniLMEmbedder], kind: torch.dtype, tolerance: float
) -> None:
    """Each row is the vector of its text embedded alone (to bfloat16's rounding)."""
    model = minilm[kind]
    together = model.embed_sync(MIXED)
    assert together.shape == (len(MIXED), DIMENSIONS) and together.dtype == np.float32
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    for i in (0, 1, 2, 3, 7, SUB_BATCH + 8):
        alone = model.embed_sync([MIXED[i]])[0]
        assert np.allclose(together[i], alone, atol=tolerance)
    question, fact, weather = together[1], together[4], together[2]
    assert float(question @ fact) > float(question @ weather)
    assert model.embed_sync([]).shape == (0, DIMENSIONS)


def test_bfloat16_and_float32_vectors_rank_alike(
    minilm: dict[torch.dtype, MiniLMEmbedder],
) -> None:
    """Workers on machines that pick different dtypes share one store: a vector of either
    kind finds the same neighbours among vectors of the other."""
    full = minilm[torch.float32].embed_sync(MIXED)
    half = minilm[torch.bfloat16].embed_sync(MIXED)
    assert float(np.einsum("ij,ij->i", full, half).min()) >= 0.999
    distinct = [0, 1, 2, 3, 7]  # the texts, once each
    for query in distinct:
        by_full = sorted(distinct, key=lambda i: -float(full[query] @ full[i]))
        by_half = sorted(distinct, key=lambda i: -float(half[query] @ full[i]))
        assert by_full == by_half


@pytest.mark.parametrize("name", ["float32", "bfloat16", "auto"])
async def test_the_dtype_setting_reaches_a_workers_embedding_model(name: DtypeName) -> None:
    settings = Settings(device="cpu", torch_dtype=name)
    embedder = await Runtime(settings).embedder()  # what the enricher and recorder share
    assert isinstance(embedder, MiniLMEmbedder)
    assert embedder.dtype == dtype(settings, "cpu")
