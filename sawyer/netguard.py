"""Refuse every network access that leaves this machine (tests and the offline dry run).

The course promises that the ``tiny`` preset runs with no network at all. Tests prove it by turning this
guard on (``SAWYER_NETGUARD=1``, or ``install()``): a mistake such as a hub download then fails loudly,
naming what it tried to reach, instead of quietly working on a machine that happens to be online.

What ``install()`` covers, in this Python process:

1. **TCP and connected UDP**: ``socket.socket.connect``/``connect_ex`` to anything but a loopback address
   (or a Unix socket) raise ``NetworkBlockedError``. Jupyter kernels talk to papermill over loopback, so
   notebooks still run.
2. **UDP datagrams**: ``sendto``/``sendmsg`` to a non-loopback address (a hand-rolled DNS query, telemetry
   over UDP, ...).
3. **Name resolution (DNS)**: ``socket.getaddrinfo``, ``gethostbyname(_ex)``, ``gethostbyaddr``, ``getnameinfo``
   (and so ``getfqdn`` and ``create_connection``) for a host name that is not a loopback name
   (``localhost``). Resolving ``huggingface.co`` already tells a DNS server what we are about to fetch.
   Numeric addresses pass (they involve no lookup; connecting to them is caught by 1 and 2). The error is
   also a ``socket.gaierror``, so libraries handle it as "no network" rather than crash on an odd type.

Every refused attempt is appended to ``blocked`` (and, when ``SAWYER_NETGUARD_LOG`` names a file, written
there as one line), so a test can assert that none happened even where a library swallowed the error.

**Child processes.** A guard inside one process cannot reach another. ``child_environment()`` returns an
environment whose ``PYTHONPATH`` starts with ``sawyer/netguard_site``, whose ``sitecustomize.py`` Python runs
at start-up, before any user code: Jupyter kernels (``sawyer.notebooks.execute``) and any Python subprocess
they start are guarded from their first line. What stays uncovered, and needs the machine's own isolation
(no route out, a network namespace such as ``unshare -n``, a firewall):

- non-Python programs (``curl``, ``git``, ``pip`` run by a different interpreter, ``apt``);
- native code that opens sockets or resolves names without Python's ``socket`` module (libcurl, gRPC,
  c-ares as used by ``aiodns``, CUDA/NCCL bootstrap, a C extension calling ``getaddrinfo`` directly);
- code that restores the original functions, or uses ``_socket`` directly.

So the guard is a tripwire for honest mistakes in Python code, not a sandbox.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

#: Put first on a child's PYTHONPATH: its ``sitecustomize.py`` installs the guard at interpreter start-up.
SITE_DIR = Path(__file__).resolve().parent / "netguard_site"
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}

blocked: list[str] = []
_installed = False


class NetworkBlockedError(ConnectionError):
    """Raised for a connection or datagram to a non-loopback address while the guard is on."""


class ResolutionBlockedError(NetworkBlockedError, socket.gaierror):
    """Raised for a DNS lookup of a non-loopback host name; also a ``socket.gaierror`` ("name not resolved")."""


def _is_loopback_host(host) -> bool:
    """``None``/``""`` (the wildcard), a loopback name, or a loopback IP literal (``127.0.0.1``, ``::1``)."""
    if host in (None, "", b""):
        return True
    host = (host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)).rstrip(".").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback  # "fe80::1%eth0" carries a zone
    except ValueError:
        return False


def _is_numeric(host) -> bool:
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
        return True
    except ValueError:
        return False


def _is_local(address) -> bool:
    """Whether a socket address (``(host, port, ...)`` or an AF_UNIX path) stays on this machine."""
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    return _is_loopback_host(address[0])


def _refuse(what: str, error: type[NetworkBlockedError] = NetworkBlockedError):
    blocked.append(what)
    log = os.environ.get("SAWYER_NETGUARD_LOG")
    if log:
        try:
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {what}\n")
        except OSError:
            pass  # the log is a convenience; the error below is the guard
    raise error(f"SAWYER offline guard: refused {what}. The tiny preset and the tests must never reach the "
                "network; set HF_HUB_OFFLINE=1 and use local paths.")


def install() -> None:
    """Turn the guard on for this process (idempotent). There is no ``uninstall``: tests keep it on."""
    global _installed
    if _installed:
        return
    sock_cls = socket.socket
    originals = {name: getattr(sock_cls, name) for name in ("connect", "connect_ex", "sendto", "sendmsg")}

    def check(sock, address, verb):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
            _refuse(f"a {verb} to {address!r}")

    # 1. TCP (and connected UDP)
    def connect(sock, address):
        check(sock, address, "connection")
        return originals["connect"](sock, address)

    def connect_ex(sock, address):
        check(sock, address, "connection")
        return originals["connect_ex"](sock, address)

    # 2. UDP datagrams: sendto(data, address) or sendto(data, flags, address); sendmsg(..., address)
    def sendto(sock, data, *args):
        check(sock, args[-1], "datagram")
        return originals["sendto"](sock, data, *args)

    def sendmsg(sock, buffers, ancdata=(), flags=0, address=None):
        if address is not None:
            check(sock, address, "datagram")
            return originals["sendmsg"](sock, buffers, ancdata, flags, address)
        return originals["sendmsg"](sock, buffers, ancdata, flags)

    for name, fn in (("connect", connect), ("connect_ex", connect_ex), ("sendto", sendto), ("sendmsg", sendmsg)):
        setattr(sock_cls, name, fn)

    # 3. name resolution: the module-level functions (socket.create_connection looks them up at call time)
    def resolver(name, numeric_ok):
        original = getattr(socket, name)

        def guarded(host, *args, **kwargs):
            target = host[0] if name == "getnameinfo" else host  # getnameinfo((host, port), flags)
            if not (_is_loopback_host(target) or (numeric_ok and _is_numeric(target))):
                _refuse(f"a DNS lookup of {target!r} ({name})", ResolutionBlockedError)
            return original(host, *args, **kwargs)

        guarded.__wrapped__ = original
        guarded.__doc__ = original.__doc__
        return guarded

    # forward lookups of a numeric address need no DNS; reverse lookups (address -> name) do
    for name, numeric_ok in (("getaddrinfo", True), ("gethostbyname", True), ("gethostbyname_ex", True),
                             ("gethostbyaddr", False), ("getnameinfo", False)):
        setattr(socket, name, resolver(name, numeric_ok))
    _installed = True


def child_environment(env: dict | None = None) -> dict:
    """A copy of ``env`` (default ``os.environ``) in which a Python child process guards itself at start-up.

    Sets ``SAWYER_NETGUARD=1`` and puts ``SITE_DIR`` first on ``PYTHONPATH``; Python imports the
    ``sitecustomize`` module found there before running anything else (a notebook kernel's first cell included).
    """
    if not (SITE_DIR / "sitecustomize.py").is_file():  # e.g. a wheel install that left the folder out
        raise RuntimeError(f"{SITE_DIR / 'sitecustomize.py'} is missing: child processes could not be guarded "
                           "(install sawyer from the repository: pip install -e .)")
    env = dict(os.environ if env is None else env)
    env["SAWYER_NETGUARD"] = "1"
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(SITE_DIR)]
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *parts])
    return env
