"""Continuous batching for a transformers-backed engine (``KONTEXT_SMOLLM2_BATCHING``).

transformers' ``ContinuousBatchingManager`` runs the model in a thread of its own
over a paged KV cache: a request joins the running batch at the next step and
leaves it at its own end, and prompts are not padded to the longest. Greedy
requests go to one manager, sampled ones (temperature above 0) to a second, made
on first use, whose temperature is set per request; a sampled answer's
log-probabilities are taken after its temperature.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any, Protocol

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from workers.engines.base import Generation, GenerationRequest
from workers.engines.hf import CausalLM, HFEngine, TokenCodec


class ContinuousLM(CausalLM, Protocol):
    """A transformers causal LM with continuous batching."""

    def init_continuous_batching(self, *args: Any, **kwargs: Any) -> Any: ...


BLOCK_SIZE = 16
"""Tokens per block of the paged KV cache."""

DEFAULT_TEMPERATURE = 0.7
"""The sampling manager's own temperature; each request sets its own."""


class ContinuousHFEngine(HFEngine):
    """An ``HFEngine`` whose calls share one running batch, whenever they are made.

    ``kv_cache_tokens``: tokens the KV cache holds over all running requests (at
    least the context window; the sampled requests' batch has a cache of its own);
    ``max_batch_tokens``: tokens one forward step takes (prompts are prefilled in
    chunks of it).
    """

    def __init__(
        self,
        name: str,
        model: ContinuousLM,
        tokenizer: TokenCodec,
        context_window: int,
        device: str = "cpu",
        kv_cache_tokens: int = 16384,
        max_batch_tokens: int = 512,
    ) -> None:
        super().__init__(name, model, tokenizer, context_window, device)
        self._lm = model
        if kv_cache_tokens < context_window:
            raise ValueError(
                f"a KV cache of {kv_cache_tokens} tokens is below the context window"
                f" ({context_window}): a long prompt would never fit"
            )
        self._num_blocks = -(-kv_cache_tokens // BLOCK_SIZE)
        self._max_batch_tokens = max_batch_tokens
        self._greedy = self._start(do_sample=False)
        self._sampling: Any = None
        self._ids = itertools.count()
        self._lock = asyncio.Lock()

    def _start(self, do_sample: bool) -> Any:
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": DEFAULT_TEMPERATURE, "top_k": None, "top_p": None}
            if do_sample
            else {"do_sample": False}
        )
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            eos_token_id=self.tokenizer.eos_id, pad_token_id=self.tokenizer.pad_id, **sampling
        )
        manager = self._lm.init_continuous_batching(
            generation_config=config,
            continuous_batching_config=ContinuousBatchingConfig(
                block_size=BLOCK_SIZE,
                num_blocks=self._num_blocks,
                max_batch_tokens=self._max_batch_tokens,
                use_async_batching=False,
                return_logprobs=True,
                per_request_processors=do_sample,  # each request's own temperature
            ),
        )
        manager.start()
        return manager

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        if not batch:
            return []
        if any(r.temperature > 0 for r in batch):
            async with self._lock:
                if self._sampling is None:
                    self._sampling = await asyncio.to_thread(self._start, True)
        encode = self.tokenizer.encode
        prompts = await asyncio.to_thread(lambda: [encode(r.prompt) for r in batch])
        outputs = await asyncio.gather(
            *(self._one(request, ids) for request, ids in zip(batch, prompts, strict=True))
        )
        return [
            self._result(
                len(ids),
                list(out.generated_tokens),
                request.max_tokens,
                [float(x) for x in out.logprobs],
            )
            for request, ids, out in zip(batch, prompts, outputs, strict=True)
        ]

    async def _one(self, request: GenerationRequest, prompt: list[int]) -> Any:
        """Add one request to its manager and wait for its finished output."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[Any] = loop.create_future()

        def deliver(output: Any) -> None:  # on this loop, through call_soon_threadsafe
            if output.is_finished() and not finished.done():
                finished.set_result(output)

        request_id = f"{self.name}-{next(self._ids)}"
        if request.temperature > 0:
            manager, extra = self._sampling, {"temperature": request.temperature}
        else:
            manager, extra = self._greedy, {}
        manager.register_result_handler(request_id, deliver)
        added = manager.add_request(
            prompt, request_id=request_id, max_new_tokens=request.max_tokens, **extra
        )
        if added is None:
            raise RuntimeError(f"the {self.name} engine's batching thread takes no requests")
        output = await finished
        if output.error is not None:
            raise RuntimeError(f"the {self.name} engine failed a request: {output.error}")
        return output

    async def close(self) -> None:
        """Stop the batching threads, each once its requests are done. The greedy one
        goes last: stopping, it puts back the model's own attention."""
        for manager in (self._sampling, self._greedy):
            if manager is not None:
                await asyncio.to_thread(manager.stop, block=True, timeout=30)
