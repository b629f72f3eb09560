"""Refuse every network connection that leaves this machine (tests and the offline dry run).

``install()`` wraps ``socket.socket.connect``/``connect_ex`` so that a connection to anything but a
loopback address (or a Unix socket) raises ``NetworkBlockedError`` naming the address. Jupyter kernels
talk to papermill over loopback, so notebooks still run. Every refused attempt is also recorded in
``blocked`` so a test can assert that none happened even where a library swallowed the error.
"""
from __future__ import annotations

import ipaddress
import socket

blocked: list[str] = []
_installed = False


class NetworkBlockedError(ConnectionError):
    """Raised for a connection to a non-loopback address while the guard is on."""


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolving it would already be a network access
        return False


def install() -> None:
    """Turn the guard on for this process (idempotent)."""
    global _installed
    if _installed:
        return
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
            blocked.append(str(address))
            raise NetworkBlockedError(
                f"SAWYER offline guard: refused a connection to {address!r}. The tiny preset and the tests "
                "must never reach the network; set HF_HUB_OFFLINE=1 and use local paths."
            )

    def connect(sock, address):
        check(sock, address)
        return original_connect(sock, address)

    def connect_ex(sock, address):
        check(sock, address)
        return original_connect_ex(sock, address)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    _installed = True
