"""``tiny``: a randomly initialised byte-level GPT-2 for fast plumbing tests.

Its weights come from seed 0, so greedy answers are the same in every process;
they are gibberish.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kontext.settings import Settings
from workers.engines.base import Message

if TYPE_CHECKING:
    from workers.engines.hf import HFEngine

EOS_ID = 256
"""Token ids 0..255 are bytes; 256 ends the text."""
CONTEXT_WINDOW = 1024
SYSTEM_PROMPT = "You are a helpful assistant."
SEED = 0


class ByteTokenizer:
    """One token per UTF-8 byte, with a plain-text chat template."""

    eos_id = EOS_ID
    pad_id = EOS_ID

    def render(self, messages: Sequence[Message]) -> str:
        turns = "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages)
        return f"{turns}<|assistant|>\n"

    def count(self, text: str) -> int:
        return len(text.encode())

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i != EOS_ID).decode(errors="replace")

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        return [b"" if i == EOS_ID else bytes([i]) for i in ids]


def load_tokenizer(settings: Settings) -> ByteTokenizer:
    return ByteTokenizer()


def load_engine(settings: Settings) -> HFEngine:
    """Build the model (a fraction of a second); it is never written to disk."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from workers.engines.hf import HFEngine

    config = GPT2Config(
        vocab_size=EOS_ID + 1,
        n_positions=CONTEXT_WINDOW,
        n_embd=128,
        n_layer=2,
        n_head=4,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = GPT2LMHeadModel(config)  # type: ignore[no-untyped-call]
    model.eval()  # type: ignore[no-untyped-call]
    return HFEngine("tiny", model, ByteTokenizer(), CONTEXT_WINDOW)
