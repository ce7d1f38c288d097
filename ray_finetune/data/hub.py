"""Whether the Hugging Face hub answers, so that loading a dataset on a machine that cannot reach it goes straight
to the local cache.

`datasets` asks the hub first on every load, even of a dataset it has cached, and retries one that does not
answer five times, backing off: ~25 s of retry warnings per load on an air-gapped cluster, and a run's data is
loaded several times (validation, each shard, its fingerprint). One short probe per process (again after
PROBE_AGAIN_S, since the data packer lives as long as the cluster) decides instead; an unreachable hub means the
load runs in `datasets`' offline mode, which reads the cache without asking.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
PROBE_AGAIN_S = 300.0

_last_probe: tuple[float, bool] | None = None
_offline_lock = threading.Lock()
_offline_depth = 0
_saved_flags: tuple[bool, bool] = (False, False)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def reachable() -> bool:
    """False when offline mode is already on (HF_HUB_OFFLINE) or the hub's host takes no connection within
    PROBE_TIMEOUT_S, name lookup included (a DNS server that never answers must not hold a load for minutes)."""
    global _last_probe
    from huggingface_hub import constants

    with _offline_lock:   # inside another thread's offline() the flag is ours, not the user's
        user_offline = _saved_flags[1] if _offline_depth else constants.HF_HUB_OFFLINE
    if user_offline:
        return False
    if _last_probe is None or time.monotonic() - _last_probe[0] > PROBE_AGAIN_S:
        _last_probe = (time.monotonic(), _connects(endpoint()))
    return _last_probe[1]


def _connects(url: str) -> bool:
    parts = urlsplit(url)
    try:
        address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    except ValueError:   # HF_ENDPOINT with a port that is not a number: no hub answers there
        return False
    answered: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=PROBE_TIMEOUT_S).close()
            answered.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)   # getaddrinfo has no timeout of its own
    probe.start()
    probe.join(PROBE_TIMEOUT_S)
    return bool(answered)


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """`datasets` and `huggingface_hub` read their offline flags at call time from these module attributes (the
    environment variables are read once, at import). Set while any thread is inside (the data packer loads in
    several threads at once), and set back when the last one leaves."""
    global _offline_depth, _saved_flags
    import datasets
    from huggingface_hub import constants

    with _offline_lock:
        if _offline_depth == 0:
            _saved_flags = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
            datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
        _offline_depth += 1
    try:
        yield
    finally:
        with _offline_lock:
            _offline_depth -= 1
            if _offline_depth == 0:
                datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = _saved_flags
