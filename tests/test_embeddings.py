"""The feature-hashing embedder (``KONTEXT_EMBEDDER=hash``): deterministic, unit-length,
never zeros, and closer for texts that share words."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from kontext.settings import Settings
from workers.embeddings import DIMENSIONS, HashEmbedder, load_embedder

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


def test_minilm_gives_each_text_its_own_vector_whatever_the_batch_holds() -> None:
    """Texts of very different lengths, more than one sub-batch of them, in an order
    that is not by length: each row is the vector of its text embedded alone."""
    from workers.embeddings import SUB_BATCH, MiniLMEmbedder

    model = MiniLMEmbedder()
    long = " ".join(["a long rambling line about the weather"] * 60)  # past MAX_TOKENS
    texts = [TEXTS[i % len(TEXTS)] if i % 7 else long for i in range(SUB_BATCH + 9)]
    together = model.embed_sync(texts)
    assert together.shape == (len(texts), DIMENSIONS)
    for i in (0, 1, 2, 3, 7, SUB_BATCH + 8):
        alone = model.embed_sync([texts[i]])[0]
        assert np.allclose(together[i], alone, atol=1e-5)
    question, fact, weather = together[1], together[4], together[2]
    assert float(question @ fact) > float(question @ weather)
    assert model.embed_sync([]).shape == (0, DIMENSIONS)
