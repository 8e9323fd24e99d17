"""API keys and tenant scoping, against the running stack.

Every route of the app is checked (the list comes from ``app.routes``, so a new
route cannot slip through): without a key and with a revoked key it answers
401; with another tenant's key, tenant A's resources answer 404 and lists do not
show them; operator-only routes answer 403 to a tenant key.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from kontext.store import keys
from producers.api.app import create_app
from producers.api.auth import operator_only
from producers.backfill import create_batch
from tests.conftest import Stack, wait_for

PUBLIC = {
    "/healthz": "liveness probe",
    "/readyz": "readiness probe",
    "/openapi.json": "the API description, no data",
    "/docs": "the API description, no data",
    "/docs/oauth2-redirect": "the API description, no data",
    "/redoc": "the API description, no data",
    "/dashboard": "the page shell; its script fetches data with the caller's key",
    "/dashboard/static/{name}": "the page's script and style",
}
"""Routes that answer without a key, and why."""
SHARED = {
    "/v1/models/{model_id}": "the deployment's models, the same for every tenant",
}
"""Routes with a path parameter that name no tenant's resource, and why."""

BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/jobs/{job_id}/review"): {"action": "approve"},
}
"""A valid body for routes that take one, so the check reaches the handler."""


@dataclass
class Owned:
    """Tenant A's resources, by path parameter name."""

    params: dict[str, str]
    job_id: str
    batch_id: str
    idempotency_key: str


def _routes(app: Any) -> Iterator[Any]:
    for route in app.routes:
        if hasattr(route, "effective_route_contexts"):  # an included router
            yield from route.effective_route_contexts()
        else:
            yield route


def _needs_operator(dependant: Any) -> bool:
    return any(
        d.call is operator_only or _needs_operator(d)
        for d in getattr(dependant, "dependencies", [])
    )


def _matrix(stack: Stack) -> list[tuple[str, str, bool]]:
    """(method, path template, operator only) for every route needing a key."""
    app = create_app(stack.settings)
    found = []
    for route in _routes(app):
        if route.path in PUBLIC:
            continue
        for method in sorted(route.methods - {"HEAD"}):
            found.append((method, route.path, _needs_operator(getattr(route, "dependant", None))))
    return found


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
async def tenants(pool: asyncpg.Pool) -> dict[str, str]:
    """Keys of two fresh tenants, and a revoked key of the first."""
    a, b = f"ta-{uuid.uuid4().hex[:6]}", f"tb-{uuid.uuid4().hex[:6]}"
    key_a = await keys.create(pool, a)
    key_b = await keys.create(pool, b)
    revoked = await keys.create(pool, a)
    await keys.revoke(pool, revoked.prefix)
    return {"a": key_a.key, "b": key_b.key, "revoked": revoked.key, "tenant_a": a}


@pytest.fixture(scope="module")
async def owned(stack: Stack, tenants: dict[str, str], pool: asyncpg.Pool) -> Owned:
    """A finished job with a webhook delivery, a conversation and a batch, all tenant A's."""
    conversation = f"auth-{uuid.uuid4().hex[:8]}"
    idempotency = f"idem-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=_bearer(tenants["a"]), timeout=30
    ) as http:
        job = await http.post(
            "/v1/jobs",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 2,
                "conversation_id": conversation,
                "idempotency_key": idempotency,
                # Nothing listens there: the delivery is created and fails, which is enough.
                "webhook": {"url": "http://127.0.0.1:9/hook"},
            },
        )
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        line = {
            "custom_id": "one",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        }
        batch = await create_batch(http, orjson.dumps(line) + b"\n", idempotency_key=idempotency)
        assert batch.status_code == 202, batch.text
        batch_id = batch.json()["id"]

        async def delivered() -> bool:
            found = (await http.get("/v1/webhooks/deliveries", params={"job_id": job_id})).json()
            return bool(found["data"])

        await wait_for(delivered, timeout=60)
        delivery = (await http.get("/v1/webhooks/deliveries", params={"job_id": job_id})).json()
        endpoint = await http.post(
            "/v1/webhooks/endpoints",
            json={"url": "http://127.0.0.1:9/endpoint", "events": ["batch.expired"]},
        )
        assert endpoint.status_code == 201, endpoint.text
    return Owned(
        params={
            "job_id": job_id,
            "conversation_id": conversation,
            "batch_id": batch_id,
            "file_id": batch.json()["input_file_id"],
            "delivery_id": delivery["data"][0]["id"],
            "endpoint_id": endpoint.json()["id"],
            "partition": "0",
            "offset": "0",
            "model_id": "tiny",
        },
        job_id=job_id,
        batch_id=batch_id,
        idempotency_key=idempotency,
    )


@pytest.fixture
async def anonymous(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        yield http


def _path(template: str, owned: Owned) -> str:
    names = [part[1:-1] for part in template.split("/") if part.startswith("{")]
    missing = [name for name in names if name not in owned.params]
    assert not missing, f"{template}: add a value for {missing} to the owned fixture"
    return template.format(**{name: owned.params[name] for name in names})


async def test_every_route_but_the_public_ones_refuses_a_missing_or_bad_key(
    stack: Stack, tenants: dict[str, str], owned: Owned, anonymous: httpx.AsyncClient
) -> None:
    matrix = _matrix(stack)
    assert len(matrix) >= 15
    headers: list[dict[str, str]] = [
        {},
        _bearer(tenants["revoked"]),
        _bearer("kx_00000000_" + "A" * 43),  # well-formed, unknown
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": tenants["a"]},  # no scheme
    ]
    for method, template, _ in matrix:
        path = _path(template, owned)
        for header in headers:
            response = await anonymous.request(
                method, path, headers=header, json=BODIES.get((method, template))
            )
            assert response.status_code == 401, (method, template, header, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
            assert tenants["a"] not in response.text


async def test_another_tenants_resources_answer_404_everywhere(
    stack: Stack, tenants: dict[str, str], owned: Owned, pool: asyncpg.Pool
) -> None:
    hidden = [
        owned.job_id,
        owned.batch_id,
        owned.params["file_id"],
        owned.params["delivery_id"],
        owned.params["endpoint_id"],
    ]
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=_bearer(tenants["b"]), timeout=30
    ) as other:
        for method, template, operator in _matrix(stack):
            path = _path(template, owned)
            response = await other.request(method, path, json=BODIES.get((method, template)))
            if operator:
                assert response.status_code == 403, (method, template, response.text)
            elif template in SHARED:
                assert response.status_code == 200, (method, template, response.text)
            elif "{" in template:
                assert response.status_code == 404, (method, template, response.text)
                assert response.json()["error"]["code"] == "not_found"
            elif method == "GET":  # a listing: tenant A's ids are not in it
                assert response.status_code == 200, (method, template, response.text)
                assert not [i for i in hidden if i in response.text], (template, response.text)
        # Submitting: A's conversation is not B's to extend; A's idempotency key is not B's.
        extend = await other.post(
            "/v1/jobs",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "what did they say?"}],
                "conversation_id": owned.params["conversation_id"],
            },
        )
        assert extend.status_code == 404, extend.text
        assert extend.json()["error"]["code"] == "conversation_not_found"
        same_key = await other.post(
            "/v1/jobs",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1,
                "idempotency_key": owned.idempotency_key,
            },
        )
        assert same_key.status_code == 202, same_key.text
        assert same_key.json()["id"] != owned.job_id
        line = {
            "custom_id": "theirs",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "conversation_id": owned.params["conversation_id"],
            },
        }
        batch = await create_batch(other, orjson.dumps(line) + b"\n")
        assert batch.status_code == 202, batch.text
        assert [(e["line"], e["code"]) for e in batch.json()["errors"]["data"]] == [
            (1, "conversation_not_found")
        ]
    # B's attempts changed nothing of A's.
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=_bearer(tenants["a"]), timeout=30
    ) as mine:
        conversation = await mine.get(f"/v1/conversations/{owned.params['conversation_id']}")
        assert conversation.status_code == 200
        batch = (await mine.get(f"/v1/batches/{owned.batch_id}")).json()
        assert batch["status"] not in ("cancelling", "cancelled")
    count = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE conversation_id = $1", owned.params["conversation_id"]
    )
    assert count == 1


async def test_user_scope_recall_never_crosses_tenants(
    stack: Stack, tenants: dict[str, str], pool: asyncpg.Pool
) -> None:
    """The same user id in two tenants: user-scope recall finds the user's other
    conversations in its own tenant only."""
    user = f"u-{uuid.uuid4().hex[:6]}"
    secret = f"The vault code is {uuid.uuid4().hex[:6]}."
    async with (
        httpx.AsyncClient(base_url=stack.api_url, headers=_bearer(tenants["a"])) as a,
        httpx.AsyncClient(base_url=stack.api_url, headers=_bearer(tenants["b"])) as b,
    ):

        async def chat(http: httpx.AsyncClient, content: str) -> dict[str, Any]:
            job = await http.post(
                "/v1/jobs",
                json={
                    "model": "tiny",
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": 1,
                    "user": user,
                    "recall_scope": "user",
                    "include_prompt": True,
                },
            )
            assert job.status_code == 202, job.text
            done = await http.get(f"/v1/jobs/{job.json()['id']}", params={"wait": 30})
            view: dict[str, Any] = done.json()
            assert view["status"] == "succeeded", view
            return view

        planted = await chat(a, secret)

        async def embedded() -> bool:
            count = await pool.fetchval(
                "SELECT count(*) FROM turns WHERE conversation_id = $1 AND embedding IS NOT NULL",
                planted["conversation_id"],
            )
            return bool(count)

        await wait_for(embedded, timeout=60)
        other = await chat(b, "What is the vault code?")
        same = await chat(a, "What is the vault code?")

    def recalled(view: dict[str, Any]) -> set[str]:
        return {m["conversation_id"] for m in view["result"]["context"]["memories"]}

    # Control: in tenant A the user's earlier conversation is recalled...
    assert planted["conversation_id"] in recalled(same)
    assert secret in same["result"]["context"]["prompt"]
    # ...in tenant B, never.
    assert planted["conversation_id"] not in recalled(other)
    assert secret not in other["result"]["context"]["prompt"]


async def test_keys_are_stored_hashed(pool: asyncpg.Pool, tenants: dict[str, str]) -> None:
    rows = await pool.fetch("SELECT row_to_json(k)::text AS row, hash FROM api_keys k")
    stored = "\n".join(row["row"] for row in rows)
    for key in (tenants["a"], tenants["b"], tenants["revoked"]):
        assert key not in stored
        secret = key[len("kx_00000000_") :]
        assert secret not in stored
        assert hashlib.sha256(key.encode()).hexdigest() in {row["hash"] for row in rows}


async def test_keys_cli_creates_a_working_key_and_revokes_it(
    stack: Stack, anonymous: httpx.AsyncClient
) -> None:
    env = {**os.environ, "DATABASE_URL": stack.settings.dsn, "COLUMNS": "200"}
    tenant = f"cli-{uuid.uuid4().hex[:6]}"

    async def cli(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kontext.cli",
            "keys",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode or 0, out.decode()

    code, out = await cli("create", "--tenant", tenant)
    assert code == 0, out
    key = out.strip().splitlines()[-1]
    shape = keys.KEY_PATTERN.fullmatch(key)
    assert shape is not None, out
    usage = await anonymous.get("/v1/usage", headers=_bearer(key))
    assert usage.status_code == 200, usage.text
    assert usage.json()["tenant"] == tenant

    code, listing = await cli("list")
    prefix = shape.group(1)
    assert code == 0 and prefix in listing and tenant in listing
    assert key not in listing

    code, out = await cli("revoke", prefix)
    assert code == 0, out
    # The key is cached for 300 s (KONTEXT_AUTH_CACHE_TTL_S in the test stack); the
    # revocation's NOTIFY is what drops it.

    async def refused() -> bool:
        return (await anonymous.get("/v1/usage", headers=_bearer(key))).status_code == 401

    await wait_for(refused, timeout=15)
    code, out = await cli("revoke", "kx_nosuchkey")
    assert code == 1


async def test_an_operator_key_reads_any_tenants_usage(
    stack: Stack, pool: asyncpg.Pool, tenants: dict[str, str], anonymous: httpx.AsyncClient
) -> None:
    operator = await keys.create(pool, f"ops-{uuid.uuid4().hex[:6]}", operator=True)
    tenant_a = tenants["tenant_a"]
    seen = await anonymous.get(
        "/v1/usage", params={"tenant": tenant_a}, headers=_bearer(operator.key)
    )
    assert seen.status_code == 200 and seen.json()["tenant"] == tenant_a
    refused = await anonymous.get(
        "/v1/usage", params={"tenant": tenant_a}, headers=_bearer(tenants["b"])
    )
    assert refused.status_code == 403
