"""The ``vllm`` engine is optional: without vLLM installed (the main venv), the engine
package still imports, the engine shares smollm2's tokenizer, and loading it says how
to install vLLM. Its real tests are in tests/vllm (run in .venv-vllm)."""

from __future__ import annotations

import importlib.util

import pytest

from kontext.settings import Settings
from schemas.events import ChatMessage
from workers.engines import context_window, load_engine, load_tokenizer


def _has_vllm() -> bool:
    try:
        return importlib.util.find_spec("vllm.v1") is not None
    except ModuleNotFoundError:
        return False


def test_vllm_engine_uses_the_smollm2_tokenizer_and_window() -> None:
    settings = Settings()
    messages = [ChatMessage(role="user", content="What is my locker code?")]
    vllm, smollm2 = load_tokenizer("vllm", settings), load_tokenizer("smollm2", settings)
    assert vllm.render(messages) == smollm2.render(messages)
    assert vllm.count("a locker code") == smollm2.count("a locker code")
    assert context_window("vllm") == context_window("smollm2")


@pytest.mark.skipif(_has_vllm(), reason="vLLM is installed here")
async def test_loading_vllm_without_it_says_how_to_install_it() -> None:
    with pytest.raises(RuntimeError, match="make install-vllm"):
        await load_engine("vllm", Settings())
