"""The course runs offline: the guard refuses outside connections, and no test attempted one."""
import socket

import pytest

from sawyer import netguard


def test_guard_refuses_a_non_loopback_connection():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(netguard.NetworkBlockedError, match="203.0.113.7"):
            s.connect(("203.0.113.7", 443))  # TEST-NET-3: never routable
    finally:
        s.close()
    assert netguard.blocked[-1].startswith("('203.0.113.7'")
    netguard.blocked.pop()


def test_guard_allows_loopback():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        client.connect(server.getsockname())
    finally:
        client.close()
        server.close()


def test_loading_a_hub_id_offline_fails_with_advice_and_no_socket():
    from sawyer.loading import ModelLoadError, load_tokenizer

    before = list(netguard.blocked)
    with pytest.raises(ModelLoadError, match="offline"):
        load_tokenizer("google/flan-t5-small-that-is-not-cached")
    assert netguard.blocked == before
