"""Batched, left-padded ``generate`` calls shared by the transformers-backed engines."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from workers.engines.base import (
    ChatTokenizer,
    Generation,
    GenerationRequest,
    Message,
    ScoredToken,
    stop_index,
)


class TokenCodec(ChatTokenizer, Protocol):
    """A chat tokenizer that also maps text to token ids and back."""

    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without adding special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens left out."""
        ...

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """The bytes each of ``ids`` stands for (joined, the UTF-8 of their text)."""
        ...


class CausalLM(Protocol):
    """The part of a transformers causal LM that the engine calls."""

    def generate(self, *args: Any, **kwargs: Any) -> Any: ...


class HFTokenizer:
    """A transformers tokenizer with its own chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self._tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id
        # A byte-level BPE vocabulary (GPT-2's, SmolLM2's) spells each byte as a character.
        spelling = bytes_to_unicode()  # type: ignore[no-untyped-call]
        self._byte_of = {char: byte for byte, char in spelling.items()}
        self._special = set(tokenizer.all_special_ids)  # left out of text, so of bytes

    def render(self, messages: Sequence[Message]) -> str:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        prompt = self._tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        assert isinstance(prompt, str)
        return prompt

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        pieces = self._tokenizer.convert_ids_to_tokens(list(ids))
        return [
            b""
            if i in self._special
            else bytes(self._byte_of[c] for c in piece)
            if all(c in self._byte_of for c in piece)
            else self.decode([i]).encode()  # not byte-level: the token's own text
            for i, piece in zip(ids, pieces, strict=True)
        ]


class ChosenLogprobs:
    """A logits processor that records each chosen token's log-probability.

    It runs before the sampling warpers (temperature), so the figures are the
    model's own distribution; it keeps one step's log-softmax at a time.
    """

    def __init__(self) -> None:
        self._previous: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1:])
        self._previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, chosen: torch.Tensor) -> None:
        if self._previous is not None:
            self._steps.append(self._previous.gather(1, chosen).squeeze(1))
            self._previous = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """Per row, the log-probability of each generated token (batch x new tokens)."""
        self._take(sequences[:, -1:])
        if not self._steps:
            return torch.zeros((sequences.shape[0], 0))
        return torch.stack(self._steps, dim=1)


def tail_tokens(stops: Sequence[Sequence[str]]) -> int:
    """How many of the newest tokens to decode to see a stop sequence of ``stops`` that
    the newest one completed: a character takes at most 4 tokens (a byte-level
    tokenizer's UTF-8 bytes)."""
    return 4 * max((len(s) for stop in stops for s in stop), default=0) + 4


class StopSequences(StoppingCriteria):
    """Ends each row of a ``generate`` call once its newest tokens' text holds one of
    that row's stop sequences, so that no more are made for it; where the answer is
    cut is ``HFEngine._result``'s to say."""

    def __init__(self, tokenizer: TokenCodec, stops: Sequence[Sequence[str]], width: int) -> None:
        self._decode = tokenizer.decode
        self._stops = stops
        self._width = width  # the padded prompts' length: new tokens start there
        self._tail = tail_tokens(stops)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        tails = input_ids[:, max(self._width, input_ids.shape[1] - self._tail) :].tolist()
        done = [
            bool(stop) and stop_index(self._decode(tail), stop) is not None
            for stop, tail in zip(self._stops, tails, strict=True)
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFEngine:
    """An engine over a transformers causal LM.

    Requests with the same temperature and top_p share one ``generate`` call (greedy
    at temperature 0, whatever their top_p);
    it runs in a worker thread so the event loop stays free.
    """

    def __init__(
        self,
        name: str,
        model: CausalLM,
        tokenizer: TokenCodec,
        context_window: int,
        device: str = "cpu",
    ) -> None:
        """``device``: where ``model`` lies; each call's inputs are put there."""
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.context_window = context_window
        self.device = device

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        return await asyncio.to_thread(self._generate, list(batch))

    async def forget_prefixes(self) -> None:
        """Nothing kept: each call computes its prompts in full."""

    async def close(self) -> None:
        """Nothing to release: the weights are freed with the engine."""

    def _generate(self, batch: list[GenerationRequest]) -> list[Generation]:
        groups: defaultdict[tuple[float, float], list[int]] = defaultdict(list)
        for index, request in enumerate(batch):
            sampled = request.temperature > 0  # greedy decoding has no nucleus
            groups[request.temperature, request.top_p if sampled else 1.0].append(index)
        results: dict[int, Generation] = {}
        for (temperature, top_p), indices in groups.items():
            outputs = self._generate_group([batch[i] for i in indices], temperature, top_p)
            results.update(zip(indices, outputs, strict=True))
        return [results[i] for i in range(len(batch))]

    def _generate_group(
        self, requests: list[GenerationRequest], temperature: float, top_p: float = 1.0
    ) -> list[Generation]:
        """One ``generate`` call up to the group's largest max_tokens."""
        pad = self.tokenizer.pad_id
        prompts = [self.tokenizer.encode(r.prompt) for r in requests]
        width = max(len(p) for p in prompts)
        longest = max(r.max_tokens for r in requests)
        if width + longest > self.context_window:
            raise ValueError(
                f"a prompt of {width} tokens and {longest} new ones exceed {self.name}'s"
                f" context window of {self.context_window} tokens"
            )
        input_ids = torch.tensor(
            [[pad] * (width - len(p)) + p for p in prompts], device=self.device
        )
        attention_mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": top_p}
            if temperature > 0
            else {"do_sample": False}
        )
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=longest,
            eos_token_id=self.tokenizer.eos_id,
            pad_token_id=pad,
            **sampling,
        )
        chosen = ChosenLogprobs()
        stops = [r.stop for r in requests]
        stopping = StoppingCriteriaList(
            [StopSequences(self.tokenizer, stops, width)] if any(stops) else []
        )
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([chosen]),
                stopping_criteria=stopping,
            )
            assert isinstance(output, torch.Tensor)
            logprobs = chosen.finish(output).tolist()
            output = output.cpu()
        return [
            self._result(len(prompt), row[width:].tolist(), scores, request)
            for prompt, row, request, scores in zip(
                prompts, output, requests, logprobs, strict=True
            )
        ]

    def _result(
        self,
        prompt_tokens: int,
        new_ids: list[int],
        logprobs: list[float],
        request: GenerationRequest,
    ) -> Generation:
        """Cut ``new_ids`` at the request's max_tokens, at its first EOS (not counted),
        or before its first stop sequence (whose tokens are counted: they were made)."""
        stop = request.stop
        new_ids = new_ids[: request.max_tokens]
        stopped = self.tokenizer.eos_id in new_ids
        if stopped:
            new_ids = new_ids[: new_ids.index(self.tokenizer.eos_id)]
        text = self.tokenizer.decode(new_ids)
        cut = stop_index(text, stop)
        if cut is not None:
            new_ids = new_ids[: self._tokens_to_stop(new_ids, stop)]
            text, stopped = text[:cut], True
        kept = logprobs[: len(new_ids)]
        tokens = None
        if request.logprobs:
            spelled = self.tokenizer.token_bytes(new_ids)
            tokens = tuple(ScoredToken(b, p) for b, p in zip(spelled, kept, strict=True))
        return Generation(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new_ids),
            finish_reason="stop" if stopped else "length",
            mean_logprob=sum(kept) / len(kept) if kept else None,
            tokens=tokens,
        )

    def _tokens_to_stop(self, ids: list[int], stop: Sequence[str]) -> int:
        """The fewest of ``ids`` whose text holds a stop sequence (the text of all of
        them must): where an engine checking after each token would have stopped."""
        low, high = 1, len(ids)
        while low < high:
            middle = (low + high) // 2
            if stop_index(self.tokenizer.decode(ids[:middle]), stop) is None:
                low = middle + 1
            else:
                high = middle
        return low
