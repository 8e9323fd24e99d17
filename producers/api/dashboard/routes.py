"""``/dashboard``: the operator dashboard, served by the API itself.

The page is a server-rendered shell plus one hand-written script and style
sheet (no CDN, no build step); the script polls ``/dashboard/api/overview``
and redraws. Every figure comes from what the API and ``/metrics`` already
read: the jobs ledger, batches and deliveries in Postgres, this process's
Prometheus registry (``kontext.metrics``) and the brokers' own offsets.

A tenant key sees its own tenant's jobs, batches, deliveries and conversations;
an operator key sees every tenant and the pipeline's internals (stage latency,
micro-batches, consumer lag, workers, dead letters).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from string import Template
from typing import Annotated, Any

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse

from kontext.settings import Settings
from kontext.store import memory
from producers.api.auth import Caller, Operator, Principal
from producers.api.conversations import ConversationId
from producers.api.dashboard import figures, histograms
from producers.api.dashboard.kafka_view import KafkaView, Letter
from producers.api.state import ApiState, state
from schemas.api import ConversationView, ErrorBody

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


class DashboardState:
    """The registry's timed snapshots, and the Kafka reader (started on first use)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.window = histograms.Window(window_s=settings.dashboard_window_s)
        self._kafka: KafkaView | None = None
        self._lock = asyncio.Lock()

    async def kafka(self, api: ApiState) -> KafkaView:
        async with self._lock:
            if self._kafka is None:
                view = KafkaView(self.settings, api.producer)
                try:
                    await view.start()
                except BaseException:
                    await view.close()
                    raise
                self._kafka = view
            return self._kafka

    async def close(self) -> None:
        if self._kafka is not None:
            await self._kafka.close()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    api: ApiState = app.state.api
    board = DashboardState(api.settings)
    app.state.dashboard = board
    sampler = asyncio.create_task(board.window.run(), name="dashboard-metrics-window")
    try:
        yield
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await board.close()


router = APIRouter(tags=["dashboard"], lifespan=lifespan)


async def _state(request: Request) -> DashboardState:
    found: DashboardState = request.app.state.dashboard
    return found


Board = Annotated[DashboardState, Depends(_state)]


def scope(principal: Principal, tenant: str | None) -> str | None:
    """The tenant to show: None for every tenant (operators only)."""
    if tenant is not None:
        return principal.tenant_for(tenant)
    return None if principal.operator else principal.tenant_id


PAGE = Template((Path(__file__).parent / "templates" / "dashboard.html").read_text())


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def page(api: Annotated[ApiState, Depends(state)]) -> HTMLResponse:
    """The page shell; it holds no data (the script fetches it with the caller's key)."""
    settings = api.settings
    return HTMLResponse(
        PAGE.substitute(
            refresh_ms=settings.dashboard_refresh_ms,
            window_s=settings.dashboard_window_s,
            models=html.escape(", ".join(settings.engines)),
        )
    )


@router.get("/dashboard/static/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no dashboard file {name}")
    return FileResponse(STATIC / name, media_type=ASSETS[name])


_STAGES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (shown as, histogram family, labels the rows are split by)
    ("queue wait", "kontext_queue_wait_seconds", ("stage", "lane")),
    ("enrichment", "kontext_enrichment_duration_seconds", ()),
    ("engine", "kontext_engine_duration_seconds", ("model",)),
    # Each lane its own row: a backfill's minutes-long waits never hide interactive p99.
    ("end to end", "kontext_job_duration_seconds", ("model", "lane")),
)
_BATCH_SIZE = "kontext_inference_batch_size"


def _merge(parts: list[histograms.Series]) -> histograms.Series:
    """One series from several with the same buckets (e.g. every status of a model)."""
    buckets: dict[float, float] = {}
    for part in parts:
        for le, n in part.buckets:
            buckets[le] = buckets.get(le, 0.0) + n
    return histograms.Series(
        buckets=tuple(sorted(buckets.items())),
        count=sum(p.count for p in parts),
        sum=sum(p.sum for p in parts),
    )


def _grouped(
    snap: histograms.Snapshot, family: str, by: tuple[str, ...]
) -> dict[str, histograms.Series]:
    """The family's series merged per value of the ``by`` labels (``"tiny, interactive"``)."""
    groups: dict[str, list[histograms.Series]] = {}
    for (name, labels), series in snap.items():
        if name == family:
            values = dict(labels)
            key = ", ".join(values.get(label, "") for label in by)
            groups.setdefault(key, []).append(series)
    return {key: _merge(parts) for key, parts in sorted(groups.items())}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def pipeline_metrics(board: DashboardState) -> dict[str, Any]:
    """Stage latency and micro-batch sizes over the window, from the process registry."""
    now, before = board.window.take()
    latency: list[dict[str, Any]] = []
    for shown, family, by in _STAGES:
        current, older = _grouped(now, family, by), _grouped(before, family, by)
        for key, series in current.items():
            recent = series.minus(older.get(key))
            latency.append(
                {
                    "stage": f"{shown} ({key})" if key else shown,
                    "family": family,
                    "count": int(recent.count),
                    "total": int(series.count),
                    "p50": _ms(recent.quantile(0.5)),
                    "p95": _ms(recent.quantile(0.95)),
                    "p99": _ms(recent.quantile(0.99)),
                }
            )
    sizes: list[dict[str, Any]] = []
    by_model = ("model",)
    current, older = _grouped(now, _BATCH_SIZE, by_model), _grouped(before, _BATCH_SIZE, by_model)
    for model, series in current.items():
        recent = series.minus(older.get(model))
        mean = recent.mean()
        sizes.append(
            {
                "model": model,
                "calls": int(recent.count),
                "mean": None if mean is None else round(mean, 2),
                "buckets": [{"le": le, "calls": int(n)} for le, n in recent.counts()],
                "total_calls": int(series.count),
                "total_requests": int(series.sum),
            }
        )
    return {"latency": latency, "batch_sizes": sizes}


@router.get("/dashboard/api/overview", responses={401: {"model": ErrorBody}})
async def overview(
    principal: Caller,
    api: Annotated[ApiState, Depends(state)],
    board: Board,
    tenant: Annotated[str | None, Query(description="operators: one tenant only")] = None,
) -> dict[str, Any]:
    """Every panel's figures in one document (pipeline internals for operators only)."""
    shown = scope(principal, tenant)
    settings = api.settings
    throughput, counts, batch_list, hooks, conversations = await asyncio.gather(
        figures.throughput(api.pool, shown, window_s=settings.dashboard_window_s),
        figures.job_counts(api.pool, shown),
        figures.recent_batches(api.pool, shown),
        figures.webhook_health(api.pool, shown),
        figures.recent_conversations(api.pool, shown),
    )
    body: dict[str, Any] = {
        "scope": {"tenant": shown, "operator": principal.operator},
        "models": settings.engines,
        "throughput": figures.as_json(throughput),
        "jobs": figures.as_json(counts),
        "batches": figures.as_json(batch_list),
        "webhooks": figures.as_json(hooks),
        "conversations": figures.as_json(conversations),
    }
    if principal.operator:
        body.update(pipeline_metrics(board))
        body.update(groups=[], workers=[], dead_letters=[], kafka_error=None)
        try:
            kafka = await board.kafka(api)
            body["groups"] = figures.as_json(await kafka.lag())
            body["workers"] = figures.as_json(kafka.workers())
            body["dead_letters"] = figures.as_json(kafka.letters())
        except KafkaError as exc:  # the rest of the page still works without the brokers
            log.warning("dashboard: Kafka unavailable: %s", exc)
            body["kafka_error"] = f"Kafka unavailable: {exc}"
    return body


@router.post(
    "/dashboard/api/dead-letters/{partition}/{offset}/redeliver",
    status_code=202,
    response_model=Letter,
    responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
async def redeliver(
    partition: int,
    offset: int,
    principal: Operator,
    api: Annotated[ApiState, Depends(state)],
    board: Board,
) -> Letter:
    """Publish a dead letter's original message to its source topic again."""
    kafka = await board.kafka(api)
    try:
        letter = await kafka.redeliver(partition, offset)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    if letter is None:
        raise HTTPException(404, f"no recent dead letter at partition {partition}, offset {offset}")
    return letter


@router.get(
    "/dashboard/api/conversations/{conversation_id}",
    responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
async def conversation(
    conversation_id: ConversationId,
    principal: Caller,
    api: Annotated[ApiState, Depends(state)],
    tenant: Annotated[str | None, Query(description="operators: one tenant only")] = None,
) -> dict[str, Any]:
    """The conversation as ``GET /v1/conversations/{id}`` shows it, and for each of its
    jobs what went into the prompt (the job result's ``context``)."""
    shown = scope(principal, tenant)
    owned = await figures.conversation_contexts(api.pool, conversation_id, shown)
    found = None
    if owned is not None:
        found = await memory.conversation(api.pool, conversation_id, owned["tenant"])
    if owned is None or found is None:
        raise HTTPException(404, f"no conversation {conversation_id}")
    view = ConversationView.model_validate(found)
    return {"conversation": view.model_dump(mode="json"), "jobs": owned["jobs"]}
