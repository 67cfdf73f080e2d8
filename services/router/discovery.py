"""Which batchers there are: each `--batcher-addresses` entry is an address, or a DNS name that
resolves to several (a headless Service lists one address per ready pod). Resolved again and
again, so batchers come and go with their pods."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

# socket.getaddrinfo's signature; tests inject their own.
GetAddrInfo = Callable[..., list[tuple[Any, ...]]]
# The name exists no more (a headless Service with no ready pod): it resolves to nothing.
NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def split_host_port(entry: str) -> tuple[str, int] | None:
    """("host", port) of "host:port" or "[v6]:port"; None for any other gRPC target
    ("unix:/path", "dns:///name", ...), which is used as it is."""
    host, sep, port = entry.rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in host:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None  # an IPv6 address without brackets, or a scheme: not host:port
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Discovery:
    """The batchers' addresses, as of the last resolve()."""

    def __init__(self, entries: Sequence[str], getaddrinfo: GetAddrInfo = socket.getaddrinfo):
        self._entries = tuple(entries)
        self._getaddrinfo = getaddrinfo
        self._last: dict[str, tuple[str, ...]] = {}  # entry -> its addresses when last resolved

    async def resolve(self) -> list[str]:
        """Every entry's addresses now, in the entries' order without repeats. A lookup that
        fails for a while (no DNS answer) keeps the entry's last addresses; a name that does
        not exist has none."""
        found = await asyncio.gather(*(self._resolve(entry) for entry in self._entries))
        return list(dict.fromkeys(address for addresses in found for address in addresses))

    async def _resolve(self, entry: str) -> tuple[str, ...]:
        parsed = split_host_port(entry)
        if parsed is None or _is_ip(parsed[0]):
            return (entry,)
        host, port = parsed
        try:
            infos = await asyncio.to_thread(self._getaddrinfo, host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            if e.errno in NO_SUCH_NAME:
                addresses: tuple[str, ...] = ()
            else:
                log.warning("resolving %s: %s (keeping its %d batchers)", entry, e,
                            len(self._last.get(entry, ())))  # fmt: skip
                return self._last.get(entry, ())
        else:
            # One family only: on a dual-stack cluster every pod has an IPv4 and an IPv6
            # address, and counting both would make it two batchers. getaddrinfo puts the
            # preferred family first.
            family = infos[0][0] if infos else None
            sockaddrs = [info[4] for info in infos if info[0] == family]
            addresses = tuple(sorted({join_host_port(sa[0], sa[1]) for sa in sockaddrs}))
        if addresses != self._last.get(entry):
            log.info("%s resolves to %s", entry, ", ".join(addresses) or "nothing")
        self._last[entry] = addresses
        return addresses
