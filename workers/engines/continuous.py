"""Continuous batching for a transformers-backed engine (``KONTEXT_SMOLLM2_BATCHING``).

transformers' ``ContinuousBatchingManager`` runs the model in a thread of its own
over a paged KV cache: a request joins the running batch at the next step and
leaves it at its own end, and prompts are not padded to the longest. Attention is
per request (``paged_attention``), not over the whole step. Greedy
requests go to one manager; sampled ones (temperature above 0) to a second, made on
first use, whose temperature is set per request; and sampled ones with a top_p below
1 to a third, which also filters each step by each request's own top_p (sorting every
row's scores: a third slower on a CPU, so the others do without). A sampled answer's
log-probabilities are taken after its temperature.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from kontext.metrics import PREFIX_CACHED_TOKENS
from workers.engines.base import Generation, GenerationRequest, stop_index
from workers.engines.hf import CausalLM, HFEngine, TokenCodec, tail_tokens
from workers.engines.paged_attention import PER_REQUEST_SDPA


class ContinuousLM(CausalLM, Protocol):
    """A transformers causal LM with continuous batching."""

    config: Any

    def init_continuous_batching(self, *args: Any, **kwargs: Any) -> Any: ...

    def set_attn_implementation(self, attn_implementation: str) -> None: ...


BLOCK_SIZE = 16
"""Tokens per block of the paged KV cache."""

DEFAULT_TEMPERATURE = 0.7
"""The sampling manager's own temperature; each request sets its own."""
DEFAULT_TOP_P = 0.9
"""The nucleus manager's own top_p (below 1, so that it filters at all); each request
sets its own."""

# transformers' own logger for continuous batching, which prints to stderr by itself:
# its INFO lines (cache sizes, the thread starting and stopping) are noise in a worker.
logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)


class ContinuousHFEngine(HFEngine):
    """An ``HFEngine`` whose calls share one running batch, whenever they are made.

    ``kv_cache_tokens``: tokens the KV cache holds over all running requests (at
    least the context window; each batch of sampled requests has a cache of its own);
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
        layer_types = getattr(model.config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(f"the {name} model has sliding-window layers: not supported here")
        self._num_blocks = -(-kv_cache_tokens // BLOCK_SIZE)
        self._max_batch_tokens = max_batch_tokens
        self._own_attention = model.config._attn_implementation
        model.set_attn_implementation(PER_REQUEST_SDPA)
        self._greedy = self._start(do_sample=False)
        self._sampled: dict[bool, Any] = {}  # by nucleus (a top_p below 1), on first use
        self._ids = itertools.count()
        self._lock = asyncio.Lock()
        self.prefix_cached_tokens = 0
        """Prompt tokens taken from blocks the KV cache kept, since the engine started."""
        self._prefixes_seen = 0  # of the running managers' own counts

    def _start(self, do_sample: bool, nucleus: bool = False) -> Any:
        sampling: dict[str, Any] = (
            {
                "do_sample": True,
                "temperature": DEFAULT_TEMPERATURE,
                "top_k": None,
                "top_p": DEFAULT_TOP_P if nucleus else None,
            }
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
                per_request_processors=do_sample,  # each request's own temperature, top_p
                use_cuda_graph=False,  # the attention plans each step on the host
            ),
        )
        manager.start()
        return manager

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        return list(await asyncio.gather(*await self.generate_each(batch)))

    async def generate_each(
        self, batch: Sequence[GenerationRequest]
    ) -> list[asyncio.Task[Generation]]:
        """Add every request of ``batch`` to the running batch at once; a task per
        request, done when that request leaves the batch."""
        if not batch:
            return []
        kinds = {r.top_p < 1 for r in batch if r.temperature > 0}
        if kinds - self._sampled.keys():
            async with self._lock:
                for nucleus in kinds - self._sampled.keys():
                    self._sampled[nucleus] = await asyncio.to_thread(self._start, True, nucleus)
        encode = self.tokenizer.encode
        prompts = await asyncio.to_thread(lambda: [encode(r.prompt) for r in batch])
        return [
            asyncio.create_task(self._answer(request, ids))
            for request, ids in zip(batch, prompts, strict=True)
        ]

    async def _answer(self, request: GenerationRequest, prompt: list[int]) -> Generation:
        out = await self._one(request, prompt)
        self._count_prefixes()
        return self._result(
            len(prompt), list(out.generated_tokens), [float(x) for x in out.logprobs], request
        )

    async def _one(self, request: GenerationRequest, prompt: list[int]) -> Any:
        """Add one request to its manager and wait for its finished output. A request
        with stop sequences comes back token by token, and is cancelled once its
        newest tokens' text holds one: its output so far is the answer."""
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[Any] = loop.create_future()
        request_id = f"{self.name}-{next(self._ids)}"
        if request.temperature > 0:
            nucleus = request.top_p < 1
            manager = self._sampled[nucleus]
            extra = {"temperature": request.temperature}
            if nucleus:
                extra["top_p"] = request.top_p
        else:
            manager, extra = self._greedy, {}
        tail, decode = tail_tokens([request.stop]), self.tokenizer.decode

        def deliver(output: Any) -> None:  # on this loop, through call_soon_threadsafe
            if finished.done():
                return
            if output.is_finished():
                finished.set_result(output)
            elif stop_index(decode(output.generated_tokens[-tail:]), request.stop) is not None:
                manager.cancel_request(request_id)
                # transformers 5.17 drops a request's handler only once it finishes.
                with manager.output_router._lock:
                    manager.output_router.result_handlers.pop(request_id, None)
                finished.set_result(output)

        manager.register_result_handler(request_id, deliver)
        added = manager.add_request(
            prompt,
            request_id=request_id,
            max_new_tokens=request.max_tokens,
            streaming=bool(request.stop),
            **extra,
        )
        if added is None:
            raise RuntimeError(f"the {self.name} engine's batching thread takes no requests")
        output = await finished
        if output.error is not None:
            raise RuntimeError(f"the {self.name} engine failed a request: {output.error}")
        return output

    def _count_prefixes(self) -> None:
        """Add what the managers took from kept blocks since the last count.

        A finished request's full prompt blocks stay in the KV cache, found by the hash
        of their tokens and those before, until their space is needed; a later prompt
        that starts with the same blocks reads them instead of computing them."""
        total = sum(
            manager.batch_processor.cache._total_prefix_length  # transformers 5.17
            for manager in self._managers()
            if manager.batch_processor is not None
        )
        if total > self._prefixes_seen:
            PREFIX_CACHED_TOKENS.labels(self.name).inc(total - self._prefixes_seen)
            self.prefix_cached_tokens += total - self._prefixes_seen
            self._prefixes_seen = total

    async def _stop(self) -> None:
        """Stop the batching threads, each once its requests are done."""
        self._count_prefixes()
        for manager in self._managers():
            await asyncio.to_thread(manager.stop, block=True, timeout=30)
        self._prefixes_seen = 0

    def _managers(self) -> list[Any]:
        return [self._greedy, *self._sampled.values()]

    async def forget_prefixes(self) -> None:
        """Start the batches again, on empty KV caches (the sampled requests' batches
        once such requests come)."""
        async with self._lock:
            await self._stop()
            self._sampled = {}
            self._greedy = await asyncio.to_thread(self._start, False)

    async def close(self) -> None:
        """Stop the batching threads; then put back the model's own attention."""
        await self._stop()
        self._lm.set_attn_implementation(self._own_attention)
