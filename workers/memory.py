"""Conversation memory's upkeep, done by the recorder once a batch's replies are out.

For the batch's succeeded jobs it embeds the turns their recording stored without
an embedding (one embedding call per micro-batch): the answers, since a user's new
message is stored with the embedding the enricher searched memory with. A
recording that found its jobs final already (a batch delivered again after a
recorder died) embeds whatever its conversations still lack. When unsummarised
history passes a token threshold it writes a level-1 summary, and when summaries
of one level pass theirs it rolls them up one level, so a long conversation always
fits. Summaries are either extractive (deterministic) or jobs the model writes
through the pipeline; a succeeded summary job's answer is stored here. The
embeddings and the summary states take one Postgres statement. Its embedding calls
yield to request-path ones but are never paused by the pacer (workers/pacing.py):
the recorder waits on them, and background work is paced where it enters the
pipeline, so its answers arrive no faster than that.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
import numpy as np
from aiokafka import AIOKafkaProducer

from kontext.settings import Settings
from kontext.store import ledger, memory
from kontext.store.memory import StoredSummary, SummaryState
from workers.embeddings import Embedder
from workers.engines.base import ChatTokenizer
from workers.intake import enqueue
from workers.summaries import Line, extractive_summary, summary_job

log = logging.getLogger(__name__)

EMBED_LIMIT = 512
"""The most turns a redelivered batch embeds for its conversations at once."""


class MemoryKeeper:
    """Keeps the memory of the conversations a recorded batch belongs to up to date."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        embedder: Embedder,
        tokenizer: ChatTokenizer,
    ) -> None:
        """``tokenizer`` counts summary tokens (the summary model's)."""
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self.embedder = embedder
        self.tokenizer = tokenizer
        self.summary_model = settings.summary_model or settings.engines[0]
        self.admitter = ledger.Admitter(pool)

    async def keep(self, recorded: ledger.Recorded) -> None:
        """Embed and summarise after a recording (idempotent: a batch delivered again
        does no harm)."""
        done = [o for o in recorded.outcomes if o.status == "succeeded"]
        if not done:
            return
        pending = list(recorded.unembedded)
        conversations = sorted({o.conversation_id for o in done})
        async with self.pool.acquire() as conn:
            again = sorted({o.conversation_id for o in done if not o.fresh})
            if again:  # recorded earlier, by a recorder that may have died before this
                known = {turn_id for turn_id, _ in pending}
                pending += [
                    turn
                    for turn in await memory.unembedded_turns(conn, again, EMBED_LIMIT)
                    if turn[0] not in known
                ]
            for outcome in done:
                answer = _summary_text(outcome)
                if outcome.summary_of is not None and answer is not None:
                    await self._store(conn, outcome.conversation_id, outcome.summary_of, answer)
            vectors: np.ndarray | list[np.ndarray] = []
            if pending:
                # Off the request path: after any enricher's call for a waiting turn.
                texts = [content for _, content in pending]
                vectors = await self.embedder.embed(texts, background=True, paced=False)
            states = await memory.keep(
                conn,
                [turn_id for turn_id, _ in pending],
                vectors,
                conversations,
                self.settings.summary_keep_recent,
            )
            for state in states:
                await self._summarise_if_due(conn, state)

    async def _store(
        self, conn: asyncpg.Connection, conversation_id: str, summary_of: dict[str, Any], text: str
    ) -> None:
        summary = StoredSummary(
            level=int(summary_of["level"]),
            first_seq=int(summary_of["first_seq"]),
            last_seq=int(summary_of["last_seq"]),
            content=text.strip(),
            tokens=self.tokenizer.count(text),
        )
        await memory.store_summary(conn, conversation_id, summary)

    async def _summarise_if_due(self, conn: asyncpg.Connection, state: SummaryState) -> None:
        if state.summary_in_flight:
            return
        settings = self.settings
        conversation = state.conversation_id
        if (
            state.pending_first is not None
            and state.pending_last is not None
            and state.pending_tokens >= settings.summary_trigger_tokens
        ):
            turns = await memory.turns_between(
                conn, conversation, state.pending_first, state.pending_last
            )
            lines: list[Line] = [(t.role, t.content) for t in turns]
            await self._summarise(conn, state, 1, state.pending_first, state.pending_last, lines)
            return
        for level in sorted(state.unrolled):
            if (
                state.unrolled[level] >= settings.summary_rollup_tokens
                and state.unrolled_count.get(level, 0) >= 2
            ):
                summaries = await memory.unrolled_summaries(conn, conversation, level)
                lines = [("summary", s.content) for s in summaries]
                first, last = summaries[0].first_seq, summaries[-1].last_seq
                await self._summarise(conn, state, level + 1, first, last, lines)
                return

    async def _summarise(
        self,
        conn: asyncpg.Connection,
        state: SummaryState,
        level: int,
        first_seq: int,
        last_seq: int,
        lines: Sequence[Line],
    ) -> None:
        settings = self.settings
        conversation_id = state.conversation_id
        if settings.summarizer == "extractive":
            text = extractive_summary(lines, settings.summary_max_tokens, self.tokenizer.count)
            await self._store(
                conn,
                conversation_id,
                {"level": level, "first_seq": first_seq, "last_seq": last_seq},
                text,
            )
            return
        job = summary_job(
            conversation_id,
            self.summary_model,
            level,
            first_seq,
            last_seq,
            lines,
            settings.summary_max_tokens,
        ).model_copy(update={"tenant_id": state.tenant_id})  # the conversation's owner
        key = f"summary:{conversation_id}:{level}:{first_seq}:{last_seq}"
        await enqueue(settings, self.admitter, self.producer, job, key)
        log.info(
            "summary job for %s turns %d-%d (level %d)", conversation_id, first_seq, last_seq, level
        )


def _summary_text(outcome: ledger.Outcome) -> str | None:
    """The summary a summary job's model wrote, if it is one."""
    if outcome.kind != "summary" or outcome.result is None or not outcome.result.choices:
        return None
    return outcome.result.choices[0].message.content
