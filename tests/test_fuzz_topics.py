"""Every topic consumer fuzzed with random and malformed bytes (hypothesis).

Random bytes, random JSON, tombstones and well-formed events of a wrong version go
to the requests, inference and completions topics of a running stack. No
consumer may crash: each bad message lands in the dead-letter topic once per
consumer group that reads it, with its reason and original bytes, and the stack
still answers a good job afterwards.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict

from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kontext.chaos.scenarios import dead_letters
from producers.client import KontextClient
from schemas.events import (
    ContextInfo,
    EnrichedRequest,
    JobCompletion,
)
from tests.conftest import Stack
from tests.factories import job_request
from tests.fuzzing import CASES, Tally

EXAMPLES = CASES or 120

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def _events() -> list[dict[str, object]]:
    """One well-formed event of each kind a consumer reads, as JSON objects."""
    request = job_request("hi", conversation_id="fuzz", max_tokens=4)
    enriched = EnrichedRequest(
        request=request, prompt="hi", context=ContextInfo(prompt_tokens=1), new_turns=[]
    )
    completion = JobCompletion(
        job_id=request.job_id, conversation_id="fuzz", model="tiny", status="failed"
    )
    return [json.loads(e.encode()) for e in (request, enriched, completion)]


wrong_versions = st.tuples(
    st.sampled_from(_events()),
    st.integers().filter(lambda v: v != 1) | st.text() | st.none() | st.floats(allow_nan=False),
).map(lambda pair: json.dumps({**pair[0], "version": pair[1]}).encode())

bad_values = st.one_of(
    st.binary(max_size=256).map(lambda b: ("bytes", b)),
    json_values.map(lambda v: ("json", json.dumps(v).encode())),
    wrong_versions.map(lambda b: ("wrong version", b)),
    st.just(("tombstone", None)),
)


def _consumers(stack: Stack) -> dict[str, set[str]]:
    """Each fuzzed topic and the consumers that must dead-letter a bad message on it."""
    topics = stack.settings.topics
    return {
        topics.requests: {"enricher"},
        topics.requests_lane("background"): {"enricher"},
        topics.inference("tiny"): {"inference-tiny"},
        topics.completions: {"recorder"},
    }


async def test_bad_messages_are_dead_lettered_and_no_consumer_crashes(
    stack: Stack, client: KontextClient
) -> None:
    tally = Tally()
    consumers = _consumers(stack)
    topics = sorted(consumers)
    cases: list[tuple[str, str, bytes | None]] = []

    @settings(max_examples=EXAMPLES, database=None, suppress_health_check=list(HealthCheck))
    @given(topic=st.sampled_from(topics), value=bad_values)
    def generate(topic: str, value: tuple[str, bytes | None]) -> None:
        cases.append((topic, *value))

    generate()
    tag = uuid.uuid4().hex[:8]
    sent: dict[bytes, tuple[str, bytes | None]] = {}
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = []
        for n, (topic, kind, value) in enumerate(cases):
            key = f"fuzz-{tag}-{n}".encode()
            sent[key] = (topic, value)
            futures.append(await producer.send(topic, value, key=key))
            tally.count(f"{kind} on {topic.split('.', 1)[1]}")
        for future in futures:
            await future
    finally:
        await producer.stop()

    want = sum(len(consumers[topic]) for topic, _ in sent.values())
    letters = await dead_letters(
        stack.settings.bootstrap, stack.settings.topics.dead_letters, f"fuzz-{tag}-".encode(), want
    )
    by_key: dict[bytes, set[str]] = defaultdict(set)
    for letter in letters:
        assert letter.key is not None and letter.reason
        topic, value = sent[letter.key]
        assert letter.source_topic == topic
        assert letter.value == value
        by_key[letter.key].add(letter.consumer)
    missing = {
        key: consumers[topic] - by_key[key]
        for key, (topic, _) in sent.items()
        if consumers[topic] - by_key[key]
    }
    assert not missing, (
        f"{len(missing)} bad messages not dead-lettered, e.g. {next(iter(missing.items()))}\n"
        + "".join(stack.output[-60:])
    )
    assert len(letters) == want

    reply = await client.chat(
        model="tiny", messages=[{"role": "user", "content": "still there?"}], timeout=60
    )
    assert reply.status == "succeeded"
    tally.record(
        "Topic consumer fuzzing (`make fuzz`, hypothesis)",
        "Random bytes, random JSON, tombstones and events of a wrong version, spread over "
        "the requests, inference (`tiny`) and completions topics of `kontext up`; "
        "each came back from the dead-letter topic once per consumer group that reads its "
        "topic (enricher; inference-tiny; recorder), with a "
        "reason and its original bytes, and a good job was still answered afterwards.",
    )
