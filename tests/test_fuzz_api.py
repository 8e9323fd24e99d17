"""The HTTP API fuzzed from its own OpenAPI spec (schemathesis): never a 5xx."""

from __future__ import annotations

import math
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import Stack
from tests.fuzzing import CASES, Tally

EXAMPLES = 8
"""Examples per operation in the normal suite; ``make fuzz`` shares its cases out evenly."""


def _served(case: Any) -> None:
    """Steer cases to the code behind validation: a served model, a short long-poll."""
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        if len(body["model"]) % 2 == 0:
            body["model"] = "tiny"
            if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 4:
                body["max_tokens"] = 4
    query = case.query
    if isinstance(query, dict) and isinstance(query.get("wait"), int | float):
        query["wait"] = min(query["wait"], 0.2)


def _fuzz(operation: Any, examples: int, tally: Tally, headers: dict[str, str]) -> None:
    """Up to ``examples`` generated requests to one operation; none may get a 5xx."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        _served(case)
        response = case.call(timeout=30, headers=headers)
        tally.count(f"{case.method} {case.path} -> {response.status_code // 100}xx")
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} {case.body!r:.500}: {response.status_code} "
            f"{response.text[:500]}"
        )

    check()


def test_no_request_gets_a_server_error(stack: Stack) -> None:
    tally = Tally()
    schema = schemathesis.openapi.from_url(f"{stack.api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    target = CASES or EXAMPLES * len(operations)
    # Operations with few distinct inputs run out early; the others share what is left.
    while tally.cases < target and operations:
        share = math.ceil((target - tally.cases) / len(operations))
        unexhausted = []
        for operation in operations:
            before = tally.cases
            _fuzz(operation, share, tally, stack.headers)
            if tally.cases - before >= share:
                unexhausted.append(operation)
        operations = unexhausted
    tally.record(
        "API fuzzing (`make fuzz`, schemathesis)",
        f"schemathesis {schemathesis.SCHEMATHESIS_VERSION} against `kontext up` (tiny and "
        "smollm2 engines) over HTTP, the cases shared evenly between the operations of "
        "`/openapi.json`; half the bodies naming a model get a served one (`tiny`, "
        "max_tokens <= 4) so jobs reach the ledger and the broker. No response was a 5xx.",
    )
