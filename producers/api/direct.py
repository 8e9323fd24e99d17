"""``POST /v1/jobs`` answered without the framework's routing and dependency machinery.

Submitting is the API's hot path, and FastAPI's per-request work (routing, solving
dependencies, exception and exit-stack middleware) was about 60% of the API's CPU
per submission. This ASGI middleware answers a well-formed submission with a valid
key itself, through the route's own ``submit_as``, and renders a refusal with
the application's own exception handlers. Anything else (no key, a bad key, a body
that is not a valid submission) goes on to the FastAPI route, which answers it as
it always has; so do all requests while tracing is on (the route has the spans).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from kontext import tracing
from producers.api import jobs
from producers.api.auth import Principal
from producers.api.limits import replaying
from producers.api.state import ApiState
from schemas.api import JobAccepted, JobSubmission

PATH = "/v1/jobs"
JSON_TYPES = (b"application/json", b"")
"""Content types the route reads as JSON (FastAPI reads a body without one as JSON)."""


class DirectJobs:
    """Answers ``POST /v1/jobs`` directly when it can; passes every other request on."""

    def __init__(self, app: ASGIApp, application: FastAPI) -> None:
        self.app = app
        self.application = application
        self.route = _route()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or tracing.enabled()
        ):
            await self.app(scope, receive, send)
            return
        message = await receive()
        if message["type"] != "http.request" or message.get("more_body", False):
            # Not one whole body (the body-size limit replays it whole): the route's.
            await self.app(scope, replaying(message, receive), send)
            return
        body: bytes = message.get("body", b"")
        headers = _headers(scope)
        principal = await self._principal(headers.get(b"authorization"))
        submission = _submission(headers.get(b"content-type", b""), body)
        if principal is None or submission is None:
            await self.app(scope, replaying(message, receive), send)
            return
        scope["route"] = self.route  # counted under the route's template
        api: ApiState = self.application.state.api
        try:
            job, created = await jobs.submit_as(api, principal, submission)
        except Exception as exc:
            await self._refuse(scope, receive, send, exc)
            return
        accepted = JobAccepted(id=job.id, status=job.status, conversation_id=job.conversation_id)
        content = accepted.model_dump_json().encode()
        await send(
            {
                "type": "http.response.start",
                "status": 202 if created else 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(content)).encode()),
                    (b"location", f"{PATH}/{job.id}".encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})

    async def _principal(self, header: bytes | None) -> Principal | None:
        """The caller, when the key is well-formed and valid; None leaves the answer
        (401, or 503 when the database is down) to the route."""
        if not header:
            return None
        scheme, _, key = header.decode("latin-1").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        api: ApiState = self.application.state.api
        try:
            found = await self.application.state.keys.verify(api.pool, key)
        except Exception:
            return None
        if found is None:
            return None
        return Principal(tenant_id=found.tenant_id, key_id=found.key_id, operator=found.operator)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
        """Answer ``exc`` with the application's handler for it, as the route would."""
        handlers = self.application.exception_handlers
        handler = next((handlers[kind] for kind in type(exc).__mro__ if kind in handlers), None)
        if handler is None:
            raise exc
        response = handler(Request(scope, receive), exc)
        if inspect.isawaitable(response):
            response = await response
        await response(scope, receive, send)


def _route() -> BaseRoute | None:
    """The route this answers for (the request metrics label requests by its path)."""
    return next(
        (
            route
            for route in jobs.router.routes
            if getattr(route, "path", None) == PATH
            and "POST" in (getattr(route, "methods", None) or ())
        ),
        None,
    )


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name: value for name, value in scope["headers"]}


def _submission(content_type: bytes, body: bytes) -> JobSubmission | None:
    """The submission, validated as the route validates it (parsed by the standard
    library's JSON, which keeps integers whole; then the model); None for anything
    the route should answer."""
    if content_type.split(b";", 1)[0].strip().lower() not in JSON_TYPES:
        return None
    try:
        data: Any = json.loads(body)
        return JobSubmission.model_validate(data)
    except (ValidationError, ValueError):
        return None
