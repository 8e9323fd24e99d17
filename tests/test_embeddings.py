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
