"""The running dev stack's addresses, for the commands run beside it.

``kontext up`` writes ``<data dir>/stack.env`` (mode 600) once it is ready: the
broker, the database URL, the API URL, the topic prefix and the dev API key, as
``NAME=value`` lines; it removes the file when it stops. ``settings()`` reads it
under the environment: a variable that is set always wins, so ``kontext keys``,
``kontext backfill`` and the Python client reach the stack with nothing exported.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values

from kontext.settings import BadSetting, Settings

NAME = "stack.env"


def path(settings: Settings) -> Path:
    return settings.data_dir / NAME


def write(settings: Settings, api_url: str | None, api_key: str) -> Path:
    """Write the stack file for ``settings`` (atomically, readable by its owner only)."""
    values = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap,
        "DATABASE_URL": settings.dsn,
        "KONTEXT_API_URL": api_url or "",
        "KONTEXT_TOPIC_PREFIX": settings.topic_prefix,
        "KONTEXT_API_KEY": api_key,
    }
    target = path(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{NAME}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("# Written by `kontext up` while it runs; removed when it stops.\n")
        out.writelines(f"{name}={value}\n" for name, value in values.items() if value)
    partial.replace(target)
    return target


def without_password(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``: for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def named(variable: str, value: str | None, settings: Settings) -> str:
    """How an error names where ``value``, the setting ``variable``, came from: `` (NAME)``,
    or this stack file's, read from a ``kontext up`` that may have stopped since;
    empty for a default."""
    if not value:
        return ""
    if variable not in os.environ and dotenv_values(path(settings)).get(variable) == value:
        return f" (from {path(settings)}: is `kontext up` running?)"
    return f" ({variable})"


def remove(settings: Settings) -> None:
    path(settings).unlink(missing_ok=True)


def settings() -> Settings:
    """The environment's settings, with what it leaves unset taken from the stack file
    (when ``kontext up`` is running with this data directory)."""
    found = path(Settings())
    if not found.is_file():
        return Settings()
    return Settings(_env_file=found)  # type: ignore[call-arg]


def database_settings() -> Settings:
    """``settings()`` for a command that needs Postgres; BadSetting (``missing``) when
    neither the environment nor a running stack names one."""
    found = settings()
    if not found.database_url:
        raise BadSetting(missing("DATABASE_URL"))
    return found


def missing(what: str) -> str:
    """The error for a command that needs ``what`` (e.g. ``DATABASE_URL``) and found none."""
    return (
        f"{what} is not set, and no running `kontext up` was found "
        f"({path(Settings())} is missing): start one, or set {what}"
    )
