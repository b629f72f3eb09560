"""The course runs offline: the guard refuses outside connections, DNS lookups and UDP datagrams, in this
process and in notebook kernels from their first cell, and no test attempted any of them."""
import socket
import subprocess
import sys

import nbformat
import pytest

from sawyer import netguard, notebooks

UNROUTABLE = ("203.0.113.7", 53)  # TEST-NET-3: never routable


@pytest.fixture
def expect_blocked(monkeypatch):
    """For tests that trigger the guard on purpose: their refusals must not fail the session (conftest)."""
    monkeypatch.delenv("SAWYER_NETGUARD_LOG", raising=False)
    before = list(netguard.blocked)
    yield
    netguard.blocked[:] = before


def test_guard_refuses_a_non_loopback_connection(expect_blocked):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(netguard.NetworkBlockedError, match="203.0.113.7"):
            s.connect(("203.0.113.7", 443))
    finally:
        s.close()
    assert netguard.blocked[-1] == "a connection to ('203.0.113.7', 443)"


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


@pytest.mark.parametrize("lookup", [
    lambda: socket.getaddrinfo("example.org", 443),
    lambda: socket.gethostbyname("huggingface.co"),
    lambda: socket.gethostbyname_ex("huggingface.co"),
    lambda: socket.gethostbyaddr("203.0.113.7"),             # a reverse lookup asks a DNS server too
    lambda: socket.getnameinfo(("203.0.113.7", 443), 0),
    lambda: socket.create_connection(("huggingface.co", 443), timeout=1),  # resolves before connecting
], ids=["getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "create_connection"])
def test_dns_lookups_are_refused(expect_blocked, lookup):
    with pytest.raises(netguard.ResolutionBlockedError, match="refused a DNS lookup of '(example.org|huggingface.co|"
                                                              r"203\.0\.113\.7)'"):
        lookup()
    assert netguard.blocked[-1].startswith("a DNS lookup of")


def test_a_refused_lookup_is_a_gaierror_and_is_recorded_even_when_swallowed(expect_blocked):
    assert issubclass(netguard.ResolutionBlockedError, socket.gaierror)
    before = len(netguard.blocked)
    assert socket.getfqdn("example.org") == "example.org"  # getfqdn swallows resolution errors ...
    assert netguard.blocked[before:] == ["a DNS lookup of 'example.org' (gethostbyaddr)"]  # ... the guard saw it


def test_loopback_names_and_numeric_addresses_resolve():
    assert {a[4][0] for a in socket.getaddrinfo("localhost", 80, socket.AF_INET)} == {"127.0.0.1"}
    assert socket.getaddrinfo("203.0.113.7", 80, socket.AF_INET)[0][4] == ("203.0.113.7", 80)  # no lookup needed
    assert socket.gethostbyname("127.0.0.1") == "127.0.0.1"


def test_udp_datagrams_out_are_refused_and_loopback_udp_works(expect_blocked):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(netguard.NetworkBlockedError, match=r"datagram to \('203.0.113.7', 53\)"):
            udp.sendto(b"query", UNROUTABLE)
        with pytest.raises(netguard.NetworkBlockedError):
            udp.sendto(b"query", 0, UNROUTABLE)  # the (data, flags, address) form
        with pytest.raises(netguard.NetworkBlockedError):
            udp.sendmsg([b"query"], [], 0, UNROUTABLE)
        with pytest.raises(netguard.NetworkBlockedError):
            udp.connect(UNROUTABLE)  # a connected UDP socket would then send() freely
        server.bind(("127.0.0.1", 0))
        udp.sendto(b"hello", server.getsockname())
        assert server.recvfrom(16)[0] == b"hello"
    finally:
        udp.close()
        server.close()
    assert netguard.blocked[-4:] == ["a datagram to ('203.0.113.7', 53)"] * 3 + ["a connection to ('203.0.113.7', 53)"]


def test_loading_a_hub_id_offline_fails_with_advice_and_no_socket():
    from sawyer.loading import ModelLoadError, load_tokenizer

    before = list(netguard.blocked)
    with pytest.raises(ModelLoadError, match="offline"):
        load_tokenizer("google/flan-t5-small-that-is-not-cached")
    assert netguard.blocked == before


# --------------------------------------------------------------------------- child processes
def test_python_subprocesses_guard_themselves_before_any_import(tmp_path):
    """``child_environment`` puts a ``sitecustomize`` first on PYTHONPATH; a distribution's own still runs."""
    other = tmp_path / "other_site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import sys\nsys.stderr.write('other sitecustomize ran\\n')\n")
    env = netguard.child_environment({"PATH": "", "PYTHONPATH": str(other)})
    assert env["PYTHONPATH"].split(":")[0] == str(netguard.SITE_DIR) and env["SAWYER_NETGUARD"] == "1"
    code = "import socket\nsocket.getaddrinfo('example.org', 443)"  # no `import sawyer` anywhere
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "ResolutionBlockedError: SAWYER offline guard: refused a DNS lookup of 'example.org'" in proc.stderr
    assert "other sitecustomize ran" in proc.stderr


def test_notebook_kernels_are_guarded_from_their_first_cell(tmp_path, monkeypatch):
    """A first cell that never imports sawyer still cannot resolve a name or send a datagram; the attempts
    reach the log the test session checks, even though the cell swallows the errors."""
    log = tmp_path / "netguard.log"
    monkeypatch.setenv("SAWYER_NETGUARD_LOG", str(log))
    first_cell = (
        "import socket\nrefused = []\n"
        "for attempt in (lambda: socket.getaddrinfo('example.org', 443),\n"
        "                lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('203.0.113.7', 53))):\n"
        "    try:\n        attempt()\n    except OSError as e:\n        refused.append(type(e).__name__)\n"
        "raise RuntimeError(f'refused: {refused}')\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(first_cell)])
    nb.metadata["kernelspec"] = dict(notebooks.KERNELSPEC)
    nbformat.write(nb, tmp_path / "guard.ipynb")
    with pytest.raises(notebooks.NotebookFailed) as err:
        notebooks.execute(tmp_path / "guard.ipynb", tmp_path / "out.ipynb", {}, cwd=tmp_path, timeout=120)
    assert err.value.cell == 0
    assert "refused: ['ResolutionBlockedError', 'NetworkBlockedError']" in err.value.error
    lines = log.read_text(encoding="utf-8").splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["a DNS lookup of 'example.org' (getaddrinfo)",
                                                        "a datagram to ('203.0.113.7', 53)"]
