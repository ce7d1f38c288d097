"""TCP ports on this machine and others: free ones for a server about to start (a Ray head, a rendezvous), and
whether a server's port answers (the head, the MLflow tracking store)."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it), for a server or a rendezvous about to start."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different ports nothing listens on now. Probed together: one probe at a time can be given the same
    port twice (seen once: Ray refused to start a head whose two servers were given one port)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((host, 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def why_unreachable(host: str, port: int, timeout_s: float) -> str | None:
    """Why a TCP connection to host:port could not be opened within `timeout_s` (the system's reason, e.g.
    "Connection refused"); None when it opened."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        return error.strerror or type(error).__name__   # a timeout has no strerror
    return None
