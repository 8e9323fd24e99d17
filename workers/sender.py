"""Sending one webhook attempt: a signed POST through an SSRF-guarded, pooled client.

The client connects only to addresses the guard has just checked (it resolves
the host itself on every new connection), follows no redirects, ignores proxy
settings from the environment, and bounds each attempt by a total timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence

import httpcore
import httpx
import orjson
from opentelemetry import trace

from kontext import tracing
from kontext.ssrf import UrlGuard, UrlRefused
from kontext.store.deliveries import Attempt, Delivery
from schemas.events import utcnow
from workers import signing
from workers.retries import RetryPolicy

USER_AGENT = "Kontext-Webhooks/0.1"
ERROR_BODY_BYTES = 256


class GuardedNetwork(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to addresses the SSRF guard admits."""

    def __init__(self, guard: UrlGuard) -> None:
        self.guard = guard
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.guard.resolve(host, port)
        for index, address in enumerate(addresses):
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError:
                if index == len(addresses) - 1:
                    raise
        raise httpcore.ConnectError(f"no address for {host}")  # pragma: no cover

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UrlRefused("webhooks never connect to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a connection pool that uses ``GuardedNetwork``."""

    def __init__(self, guard: UrlGuard, max_connections: int) -> None:
        # Only the pool is replaced; httpx's request handling stays as it is.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
            network_backend=GuardedNetwork(guard),
        )


class Sender:
    """Makes attempts; one pooled client for every delivery of the service."""

    def __init__(
        self,
        guard: UrlGuard,
        secrets: Sequence[str],
        policy: RetryPolicy,
        *,
        timeout_s: float,
        max_connections: int,
    ) -> None:
        self.secrets = list(secrets)
        self.policy = policy
        self.timeout_s = timeout_s
        self.client = httpx.AsyncClient(
            transport=GuardedTransport(guard, max_connections),
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": USER_AGENT, "content-type": "application/json"},
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def attempt(self, delivery: Delivery) -> Attempt:
        """POST the delivery once; any answer but 2xx, or none, is a failed attempt. When
        its job was traced, the attempt is a ``webhook delivery`` span of its trace, and
        the request carries that span's ``traceparent``."""
        attempted_at = utcnow()
        began = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        span: trace.Span | None = None
        if delivery.traceparent is not None and tracing.enabled():
            span = tracing.start(
                "webhook delivery",
                tracing.from_traceparent(delivery.traceparent),
                kind=trace.SpanKind.CLIENT,
                attributes={
                    "kontext.delivery_id": str(delivery.id),
                    "kontext.attempt": delivery.attempt,
                    "http.request.method": "POST",
                },
            )
        try:
            status_code, error = await self._post(delivery, span)
        except UrlRefused as exc:
            error = str(exc)
        except TimeoutError:
            error = f"timed out after {self.timeout_s:g}s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if span is not None:
            if status_code is not None:
                span.set_attribute("http.response.status_code", status_code)
            if error is not None:
                tracing.fail(span, "delivery_failed", error)
            span.end()
        return Attempt(
            delivery_id=delivery.id,
            attempt=delivery.attempt,
            attempted_at=attempted_at,
            latency_ms=round((time.perf_counter() - began) * 1000),
            status_code=status_code,
            error=error,
            retry_in_s=None if error is None else self.policy.delay_after(delivery.cycle_attempt),
        )

    async def _post(
        self, delivery: Delivery, span: trace.Span | None = None
    ) -> tuple[int | None, str | None]:
        secrets = [delivery.secret] if delivery.secret else self.secrets
        if not secrets:
            return None, "no signing secret: set KONTEXT_WEBHOOK_SECRET"
        body = orjson.dumps(delivery.payload)
        headers = signing.headers(secrets, str(delivery.id), int(time.time()), body)
        if span is not None:
            headers.update((k, v.decode()) for k, v in tracing.headers_for(span))
        async with asyncio.timeout(self.timeout_s):
            async with self.client.stream(
                "POST", delivery.url, content=body, headers=headers
            ) as response:
                if response.is_success:
                    return response.status_code, None
                snippet = b""
                async for chunk in response.aiter_raw():
                    snippet += chunk
                    if len(snippet) >= ERROR_BODY_BYTES:
                        break
                text = snippet[:ERROR_BODY_BYTES].decode(errors="replace").strip()
                return response.status_code, f"HTTP {response.status_code}" + (
                    f": {text}" if text else ""
                )
