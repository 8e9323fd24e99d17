"""The memory worker: keeps conversation memory up to date, off the request path.

It reads the reply topic. For each recorded turn it embeds the conversation's
turns stored without an embedding (one embedding call and one write per
micro-batch): the answers, since a user's new message is stored with the
embedding the enricher searched memory with. When unsummarised history passes
a token threshold it writes a level-1 summary, and when summaries of one level
pass theirs it rolls them up one level, so a long conversation always fits.
Summaries are either extractive (deterministic) or jobs the model writes
through the pipeline; a succeeded summary job's answer is stored here. Its
embedding calls yield to request-path ones, and a batch of only background-lane
jobs is also paced like other background work (workers/pacing.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from kontext.connections import FetchTempo
from kontext.settings import Settings
from kontext.store import ledger, memory
from kontext.store.memory import StoredSummary, SummaryState
from schemas.events import ReplyHead
from schemas.topics import Group
from workers.consumer import BatchConsumer
from workers.deadletter import DeadLetters
from workers.embeddings import Embedder
from workers.engines import load_tokenizer
from workers.engines.base import ChatTokenizer
from workers.intake import enqueue
from workers.records import Record
from workers.services import ConsumerService, Resources, Service, service
from workers.summaries import Line, extractive_summary, summary_job

log = logging.getLogger(__name__)

EMBED_LIMIT = 512


class MemoryWorker:
    name = "memory"

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
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, self.name)

    async def handle(self, records: Sequence[Record]) -> None:
        letters: list[asyncio.Future[object]] = []
        decoded = await self.dead_letters.decode(records, ReplyHead.decode, "JobReply", letters)
        await asyncio.gather(*letters)
        done = [reply for _, reply in decoded if reply.status == "succeeded"]
        if not done:
            return
        async with self.pool.acquire() as conn:
            kinds = await memory.job_kinds(conn, [r.job_id for r in done])
            for reply in done:
                job = kinds.get(reply.job_id)
                if job is not None and job.summary_of is not None and job.answer is not None:
                    await self._store(conn, reply.conversation_id, job.summary_of, job.answer)
            conversations = sorted({r.conversation_id for r in done})
            # Paced like other background work only when it is all background-lane work.
            paced = all(job.background for job in kinds.values()) and bool(kinds)
            await self._embed(conn, conversations, paced)
            states = await memory.summary_states(
                conn, conversations, self.settings.summary_keep_recent
            )
            for state in states:
                await self._summarise_if_due(conn, state)

    async def _embed(
        self, conn: asyncpg.Connection, conversations: Sequence[str], paced: bool
    ) -> None:
        pending = await memory.unembedded_turns(conn, conversations, EMBED_LIMIT)
        if pending:
            # Off the request path: after any enricher's call for a waiting turn.
            texts = [content for _, content in pending]
            vectors = await self.embedder.embed(texts, background=True, paced=paced)
            await memory.store_embeddings(conn, [turn_id for turn_id, _ in pending], vectors)

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


def groups(settings: Settings) -> list[Group]:
    return [settings.topics.group("memory", "memory", settings.topics.replies)]


@service("memory", groups)
async def memory_service(shared: Resources) -> list[Service]:
    settings = shared.settings
    [reads] = groups(settings)
    model = settings.summary_model or settings.engines[0]
    worker = MemoryWorker(
        settings,
        shared.pool,
        shared.producer,
        await shared.embedder(),
        load_tokenizer(model, settings),
    )
    consumer = BatchConsumer(
        shared.consumer(reads),
        worker,
        max_size=settings.stage_batch_max_size,
        max_wait_ms=settings.batch_max_wait_ms,
        tempo=FetchTempo.of(settings),
    )
    return [ConsumerService(consumer)]
