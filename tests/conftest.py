"""Shared test set-up: fully offline, network guarded, tiny models built once per session.

Every test runs with the hub switched off (``HF_HUB_OFFLINE=1``) and with ``sawyer.netguard`` installed,
so a socket to any non-loopback address raises. ``test_offline.py`` checks that nothing was attempted.
"""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["SAWYER_NETGUARD"] = "1"  # also inherited by notebook kernels started from tests
# Guarded child processes (notebook kernels) append their refused attempts here; checked at the session's end.
os.environ["SAWYER_NETGUARD_LOG"] = os.path.join(tempfile.gettempdir(), f"sawyer-netguard-{os.getpid()}.log")

import pytest  # noqa: E402
import torch  # noqa: E402

from sawyer import netguard  # noqa: E402

netguard.install()
torch.set_num_threads(1)  # tiny models gain nothing from a second thread; one keeps results identical everywhere


@pytest.fixture(scope="session")
def tiny_paths():
    """Folders of every tiny model (built on first use, cached under $SAWYER_CACHE)."""
    from sawyer import tiny

    return tiny.build_all()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any code (even code that swallowed the error) tried to reach the network."""
    log = os.environ.get("SAWYER_NETGUARD_LOG", "")
    children = []
    if os.path.exists(log):
        with open(log, encoding="utf-8") as f:
            children = [line.strip() for line in f if not line.startswith(f"{os.getpid()} ")]
        os.remove(log)
    if netguard.blocked or children:
        attempts = netguard.blocked + [f"(pid {line})" for line in children]
        print(f"\nSAWYER offline guard: {len(attempts)} outside network access(es) attempted: {attempts}")
        session.exitstatus = 1
