"""The ports Kontext listens on: one it cannot bind is one line naming its setting."""

from __future__ import annotations

import errno
import socket

API_PORT = "KONTEXT_API_PORT / --port"
METRICS_PORT = "KONTEXT_METRICS_PORT"


class CannotListen(Exception):
    """A port Kontext is to listen on is taken (or not this process's to bind): the
    message names the port, the host and the setting that chose them."""


def cannot_listen(host: str, port: int, setting: str, exc: OSError) -> CannotListen:
    """The error for ``exc``, raised binding ``host:port`` as ``setting`` says."""
    if exc.errno == errno.EADDRINUSE:
        return CannotListen(f"port {port} on {host} is in use ({setting})")
    return CannotListen(f"cannot listen on {host}:{port} ({setting}): {exc.strerror or exc}")


def check_free(host: str, port: int | None, setting: str) -> None:
    """CannotListen if ``port`` cannot be bound on ``host`` now, as the API binds it (so
    a taken port is refused before anything starts); 0 or None: nothing to check."""
    if not port:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise cannot_listen(host, port, setting, exc) from None
