"""Every Kafka topic name, in one place."""

from __future__ import annotations

from dataclasses import dataclass

LANES = ("interactive", "background")

JOB_ID_HEADER = "job-id"
"""A reply's job id as a Kafka record header: a reader skips others' replies without
decoding them."""


@dataclass(frozen=True)
class Group:
    """A consumer group of the pipeline: its id, the service behind it, what it reads."""

    id: str
    service: str
    topics: tuple[str, ...]
    model: str | None = None


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix, so deployments (and tests) can share a cluster."""

    prefix: str = "kontext"

    @property
    def requests(self) -> str:
        """Admitted interactive job requests (JobRequest), keyed by conversation id."""
        return f"{self.prefix}.requests"

    def requests_lane(self, priority: str) -> str:
        """Admitted job requests of one priority lane: a backfill queued for enrichment
        never holds up interactive requests."""
        return self.requests if priority == "interactive" else f"{self.prefix}.requests.{priority}"

    def inference(self, model: str, priority: str = "interactive") -> str:
        """Enriched requests for one model's inference workers (EnrichedRequest), one
        topic per priority lane."""
        lane = "" if priority == "interactive" else f".{priority}"
        return f"{self.prefix}.inference.{model}{lane}"

    @property
    def completions(self) -> str:
        """Engine output, not yet recorded (JobCompletion)."""
        return f"{self.prefix}.completions"

    @property
    def replies(self) -> str:
        """Recorded results for async clients (JobReply): the reply topic."""
        return f"{self.prefix}.replies"

    @property
    def submissions(self) -> str:
        """Jobs from any Kafka client (a ``POST /v1/jobs`` body, key and reply address in
        headers: ``schemas.submissions``), read by the submissions gateway."""
        return f"{self.prefix}.submissions"

    @property
    def limits(self) -> str:
        """Tenants' limit state (TenantLimitStatus) as the enrichers decided it, followed
        by every API replica."""
        return f"{self.prefix}.limits"

    @property
    def heartbeats(self) -> str:
        """Inference workers' heartbeats (WorkerHeartbeat), followed by the router."""
        return f"{self.prefix}.heartbeats"

    @property
    def dead_letters(self) -> str:
        """Messages no consumer could handle (DeadLetter), with the reason."""
        return f"{self.prefix}.deadletter"

    def group(self, name: str, service: str, *topics: str, model: str | None = None) -> Group:
        """The consumer group ``name`` under this prefix, reading ``topics``."""
        return Group(f"{self.prefix}-{name}", service, topics, model)

    def all(self, models: list[str]) -> list[str]:
        return [
            self.submissions,
            *(self.requests_lane(lane) for lane in LANES),
            *(self.inference(m, lane) for m in models for lane in LANES),
            self.completions,
            self.replies,
            self.dead_letters,
            self.limits,
            self.heartbeats,
        ]
