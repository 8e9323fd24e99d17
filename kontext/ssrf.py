"""The SSRF guard for webhook URLs: http(s) only, public addresses only, unless allow-listed.

A URL is checked when a job is submitted, and its host is resolved and checked
again on every connection the dispatcher opens (``resolve``), which then
connects to the checked address itself: DNS cannot change in between.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
RESOLVE_TIMEOUT_S = 5.0


class UrlRefused(Exception):
    """A webhook URL the guard will not call; the message says why."""


def refusal(address: IPAddress) -> str | None:
    """Why an address is not a public destination, or None when it is one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for reason, flagged in (
        ("an unspecified address", address.is_unspecified),
        ("a loopback address", address.is_loopback),
        ("a link-local address", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
    ):
        if flagged:
            return reason
    if not address.is_global:
        return "not a globally routable address"
    return None


class UrlGuard:
    """Checks webhook URLs against the address rules and an allow-list."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.hosts: set[str] = set()
        self.networks: list[IPNetwork] = []
        for entry in allow:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))

    async def check(self, url: str) -> None:
        """Raise UrlRefused unless ``url`` is http(s) and its host passes ``resolve``."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise UrlRefused(f"the webhook URL is malformed: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise UrlRefused(f"the webhook URL must be http or https, not {parts.scheme!r}")
        if not parts.hostname:
            raise UrlRefused("the webhook URL has no host")
        if parts.username is not None or parts.password is not None:
            raise UrlRefused("the webhook URL must not carry credentials")
        await self.resolve(parts.hostname, port or (443 if parts.scheme == "https" else 80))

    async def resolve(self, host: str, port: int) -> list[str]:
        """The host's addresses, all allowed; UrlRefused if any is not (or none resolve)."""
        name = host.strip("[]").lower().rstrip(".")
        try:
            literal: IPAddress | None = ipaddress.ip_address(name)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            addresses = await self._lookup(name, port)
        if name in self.hosts:
            return [str(a) for a in addresses]
        for address in addresses:
            reason = refusal(address)
            if reason and not any(address in network for network in self.networks):
                raise UrlRefused(
                    f"the webhook host {host!r} resolves to {address}, {reason}; "
                    "KONTEXT_WEBHOOK_ALLOW_HOSTS can admit it"
                )
        return [str(a) for a in addresses]

    @staticmethod
    async def _lookup(name: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            raise UrlRefused(f"the webhook host {name!r} does not resolve: {exc}") from None
        found: list[IPAddress] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if address not in found:
                found.append(address)
        if not found:
            raise UrlRefused(f"the webhook host {name!r} does not resolve")
        return found
