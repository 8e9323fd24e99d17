"""A Kontext deployment as separate processes, so faults can hit each one alone.

The embedded broker and Postgres, and one ``kontext worker NAME`` process per
service, all on fixed ports so a restarted broker or database comes back where
the services expect it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kontext import migrate
from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from kontext.app.runtime import SERVICES
from kontext.connections import ensure_topics
from kontext.settings import Settings
from kontext.store import keys

READY = re.compile(r"Kontext ready")
READY_TIMEOUT_S = 120.0
ENGINE = "null"
"""No model: the scenarios test the pipeline's guarantees at a high rate, not a model."""
# The deployment signing secret (the chaos receiver counts deliveries, it does not verify).
WEBHOOK_SECRET = "whsec_a29udGV4dC1jaGFvcy13ZWJob29rLXNlY3JldCEhISE="


def chaos_env(bootstrap: str, database_url: str, prefix: str, lease_s: float) -> dict[str, str]:
    """Environment of every service: tiny engine, short leases, fast retries."""
    env = dict(os.environ)
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        DATABASE_URL=database_url,
        KONTEXT_ENGINES=ENGINE,
        KONTEXT_TOPIC_PREFIX=prefix,
        KONTEXT_TOPIC_PARTITIONS="2",
        KONTEXT_EMBEDDER="hash",
        # A restarted service's group rejoins after about twice this (a kill's recovery).
        KONTEXT_KAFKA_SESSION_TIMEOUT_MS="2000",
        KONTEXT_KAFKA_HEARTBEAT_INTERVAL_MS="500",
        KONTEXT_JOB_LEASE_S=str(lease_s),
        KONTEXT_RECONCILE_INTERVAL_S="1",
        KONTEXT_SUMMARIZER="extractive",
        KONTEXT_WEBHOOK_SECRET=WEBHOOK_SECRET,
        KONTEXT_WEBHOOK_ALLOW_HOSTS="127.0.0.1",
        KONTEXT_WEBHOOK_RETRY_SCHEDULE_S="0,0.5,1",
        KONTEXT_WEBHOOK_MAX_ATTEMPTS="1000",
        KONTEXT_WEBHOOK_RETRY_JITTER="0",
        KONTEXT_WEBHOOK_POLL_INTERVAL_S="0.2",
        KONTEXT_WEBHOOK_TIMEOUT_S="2",
        HF_HUB_OFFLINE="1",
    )
    return env


class ServiceProcess:
    """One ``kontext worker NAME`` process, its output in a log file."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, port: int | None) -> None:
        self.name = name
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def spawn(self) -> None:
        args = [sys.executable, "-m", "kontext.cli", "worker", self.name, "--engine", ENGINE]
        if self.port is not None:
            args += ["--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts + 1} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                args,
                env=self.env,
                cwd=self.log_path.parent,  # faust writes its data dir into the cwd
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def ready(self) -> bool:
        """The current start printed its ready line (and the process still runs)."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        text = self.log_path.read_text(errors="replace")
        return bool(READY.search(text.rsplit("=== start", 1)[-1]))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no commit, in-flight work abandoned."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Cluster:
    """Broker, database and services, started and broken on demand.

    Starts its own broker and database unless given running ones (which it then
    leaves running when it stops).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        lease_s: float = 15.0,
        prefix: str = "chaos",
        services: Sequence[str] = SERVICES,
        broker: EmbeddedBroker | None = None,
        database: EmbeddedPostgres | None = None,
    ) -> None:
        self.workdir = workdir
        self.owns = broker is None, database is None
        self.broker = broker or EmbeddedBroker(port=free_port(), log_path=workdir / "broker.log")
        self.database = database or EmbeddedPostgres(workdir / "postgres", port=free_port())
        self.api_port = free_port()
        self.env = chaos_env(self.broker.bootstrap_servers, self.database.url, prefix, lease_s)
        self.settings = Settings(
            kafka_bootstrap_servers=self.broker.bootstrap_servers,
            database_url=self.database.url,
            topic_prefix=prefix,
            topic_partitions=2,
            engines=[ENGINE],
        )
        self.lease_s = lease_s
        self.api_key: str | None = None
        """A key of the default tenant, minted at start."""
        self.services = {
            name: ServiceProcess(name, self.env, workdir, self.api_port if name == "api" else None)
            for name in services
        }

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    async def start(self) -> None:
        if self.owns[0]:
            self.broker.start()
        if self.owns[1]:
            self.database.start()
        await asyncio.to_thread(migrate.upgrade, self.database.url)
        self.api_key = await keys.mint(self.settings.dsn)
        await self.create_topics()
        for service in self.services.values():
            service.spawn()
        await self.wait_ready(*self.services)

    async def create_topics(self) -> None:
        await ensure_topics(self.settings, self.settings.topics.all(self.settings.engines))

    async def wait_ready(self, *names: str, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.services[n].ready() for n in names):
            dead = [n for n in names if not self.services[n].alive()]
            if dead:
                raise RuntimeError(f"services exited during start-up: {dead}; see {self.workdir}")
            if time.monotonic() > deadline:
                waiting = [n for n in names if not self.services[n].ready()]
                raise TimeoutError(f"services not ready after {timeout}s: {waiting}")
            await asyncio.sleep(0.2)

    async def kill_and_restart(self, name: str) -> None:
        """kill -9 a service, start it again, wait until it serves."""
        service = self.services[name]
        service.kill()
        service.spawn()
        await self.wait_ready(name)

    async def restart_broker(self) -> None:
        """Stop the broker (its messages are gone: in-memory storage) and start a fresh one
        on the same port, with the topics created again as an operator would."""
        self.broker.stop()
        self.broker.start()
        await self.create_topics()

    def stop_database(self) -> None:
        self.database.stop()

    def start_database(self) -> None:
        """The same data directory and port."""
        self.database.start()

    def dead(self) -> list[str]:
        """Services whose process exited (a crash: none is ever stopped by a scenario)."""
        return [name for name, s in self.services.items() if not s.alive()]

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every service (API first), then the database and the broker if its own."""
        codes = {name: service.stop() for name, service in self.services.items()}
        if self.owns[1]:
            self.database.stop()
        if self.owns[0]:
            self.broker.stop()
        return codes
