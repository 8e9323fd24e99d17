"""OpenAI-compatible bodies: ``/v1/chat/completions`` (request, completion, stream chunk)
and ``/v1/models``, so the official OpenAI clients work against Kontext.

A request is turned into a ``JobSubmission``; what Kontext cannot honour (several
choices, tools, penalties...) is named by
``ChatCompletionRequest.unsupported`` so the route refuses it with a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from schemas.api import CONVERSATION_ID_PATTERN, JobSubmission
from schemas.events import ChatCompletion, ChoiceLogprobs, RecallScope, Usage

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""The roles Kontext takes, and the role each is stored as (``developer`` is OpenAI's
newer name for ``system``)."""


class ContentPart(BaseModel):
    """One part of a message's content; only ``text`` parts are served."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(max_length=64)
    text: str | None = None


class Message(BaseModel):
    """An OpenAI chat message. Fields an OpenAI client may echo back from a response
    (``refusal``, ``annotations``...) are ignored; tool calls are refused."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None

    def text(self) -> str:
        """The content as one string (text parts joined by newlines)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content or ())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: OpenAI's body, plus Kontext's ``conversation_id``
    (continue a conversation: send only the new messages), ``include_prompt`` and
    ``recall_scope``. Without ``conversation_id`` a request is stateless: its messages
    are the whole prompt."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="default 0 (greedy), not OpenAI's 1"
    )
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    user: str | None = Field(default=None, min_length=1, max_length=128)
    metadata: dict[str, Any] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    conversation_id: str | None = Field(default=None, pattern=CONVERSATION_ID_PATTERN)
    include_prompt: bool = False
    recall_scope: RecallScope = "conversation"

    # Taken only with the value that changes nothing (see ``unsupported``).
    n: int | None = Field(default=None, ge=1, le=128)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    # Accepted and ignored: hints that do not change what a served model answers here.
    seed: int | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """The first parameter Kontext cannot honour, and why; None when all can be."""
        checks: list[tuple[str, bool, str]] = [
            ("n", self.n not in (None, 1), "only one choice (n=1) is generated"),
            ("presence_penalty", bool(self.presence_penalty), "penalties are not supported"),
            ("frequency_penalty", bool(self.frequency_penalty), "penalties are not supported"),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
            (
                "top_logprobs",
                bool(self.top_logprobs),
                "only the chosen tokens' log-probabilities are returned (top_logprobs 0)",
            ),
            ("tools", bool(self.tools), "tools are not supported"),
            ("tool_choice", self.tool_choice not in (None, "none"), "tools are not supported"),
            ("functions", bool(self.functions), "functions are not supported"),
            ("function_call", self.function_call not in (None, "none"), "no function calling"),
            (
                "response_format",
                self.response_format not in (None, {"type": "text"}),
                "only text responses are supported",
            ),
            ("modalities", self.modalities not in (None, ["text"]), "only text output"),
            ("audio", self.audio is not None, "audio output is not supported"),
            ("prediction", self.prediction is not None, "predicted outputs are not supported"),
            ("web_search_options", self.web_search_options is not None, "no web search"),
            (
                "max_completion_tokens",
                None not in (self.max_tokens, self.max_completion_tokens)
                and self.max_tokens != self.max_completion_tokens,
                "max_tokens and max_completion_tokens differ; send one",
            ),
        ]
        for param, refused, why in checks:
            if refused:
                return param, why
        for index, message in enumerate(self.messages):
            where = f"messages[{index}]"
            if message.role not in ROLES:
                return f"{where}.role", f"role {message.role!r} is not supported (no tools)"
            if message.tool_calls or message.function_call:
                return f"{where}.tool_calls", "tool calls are not supported"
            if isinstance(message.content, list):
                for part in message.content:
                    if part.type != "text" or part.text is None:
                        return f"{where}.content", f"content part {part.type!r} is not supported"
        return None

    def submission(self, conversation_id: str | None, idempotency_key: str | None) -> JobSubmission:
        """The job for this request; raises pydantic's ValidationError (e.g. the last
        message is not the user's)."""
        return JobSubmission.model_validate(
            {
                "model": self.model,
                "messages": [
                    {"role": ROLES.get(m.role, m.role), "content": m.text()} for m in self.messages
                ],
                "conversation_id": conversation_id,
                "max_tokens": self.max_completion_tokens or self.max_tokens,
                "temperature": 0.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p,
                "stop": self.stop or None,
                "logprobs": bool(self.logprobs),
                "user": self.user,
                "metadata": self.metadata or {},
                "include_prompt": self.include_prompt,
                "recall_scope": self.recall_scope,
                "idempotency_key": idempotency_key,
            }
        )


class ChunkDelta(BaseModel):
    """What a chunk adds; fields it does not carry are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed answer (``chat.completion.chunk``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


def chunks(completion: ChatCompletion, include_usage: bool) -> list[ChatCompletionChunk]:
    """A finished completion as a stream: the role, the whole content, the finish
    reason, then (``include_usage``) the usage with no choices."""
    choice = completion.choices[0]

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=completion.id,
            created=completion.created,
            model=completion.model,
            choices=choices,
            usage=usage,
        )

    stream = [
        chunk([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))]),
        chunk(
            [
                ChunkChoice(
                    delta=ChunkDelta(content=choice.message.content), logprobs=choice.logprobs
                )
            ]
        ),
        chunk([ChunkChoice(delta=ChunkDelta(), finish_reason=choice.finish_reason or "stop")]),
    ]
    if include_usage:
        stream.append(chunk([], completion.usage))
    return stream


class Model(BaseModel):
    """A served model (``root``: the engine answering an alias)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "kontext"
    root: str


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[Model]
