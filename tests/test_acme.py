"""Automatic certificates against a REAL ACME CA (pebble), validated through the edge itself.

One module fixture: a SQLite directory, a backend, ``edge serve --workers 2`` (HTTP + HTTPS
on loopback, ``[acme] enabled``) and pebble + challtestsrv whose HTTP-01 / TLS-ALPN-01
ports are the edge's listeners. The tests drive it with the real ``edge`` CLI and real
``curl``/``openssl`` clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from edge.directory.secrets import KeyBox, generate_key
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from tests import support_pebble
from tests.support_pebble import CAFront, Pebble, Refusal
from tests.test_serve import ROOT, EdgeServe, make_db, wait_for

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow,
              pytest.mark.skipif(not support_pebble.available() and not os.environ.get("CI"),
                                 reason="pebble is not installed")]


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"backend saw {self.headers['Host']}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Env:
    tmp: Path
    db_url: str
    key: str
    serve: EdgeServe
    pebble: Pebble
    http_port: int
    https_port: int
    root: Path
    """pebble's root certificate: what a client trusts to verify issued certificates."""

    def cli(self, *args: str, config: str = "edge.toml",
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("EDGE_CONFIG", None)
        env.pop("EDGE_DATABASE_URL", None)
        return subprocess.run(
            [sys.executable, "-c", "import sys; from edge.cli.main import main; sys.exit(main())",
             *args, "--config", str(self.tmp / config)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict[str, dict[str, Any]]:
        result = self.cli("cert", "status", "--json")
        assert result.returncode == 0, result.stderr
        return {row["hostname"]: row for row in json.loads(result.stdout)}

    def run(self, coro_fn: Any) -> Any:
        async def go() -> Any:
            store = store_for_url(self.db_url)
            await store.open()
            try:
                return await coro_fn(DirectoryService(store, KeyBox.from_text(self.key)))
            finally:
                await store.close()
        return asyncio.run(go())

    def add_site(self, name: str, *flags: str, tenant: str = "ta") -> None:
        result = self.cli("site", "add", name, "--tenant", tenant, *flags)
        assert result.returncode == 0, result.stderr

    def served_certificate(self, name: str) -> x509.Certificate:
        """The certificate the edge serves for ``name``, verified against pebble's root."""
        ctx = ssl.create_default_context(cafile=str(self.root))
        with socket.create_connection(("127.0.0.1", self.https_port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def _config(tmp: Path, db_url: str, pebble_ca: Path, extra: str = "") -> str:
    return (f'[database]\nurl = "{db_url}"\n[secrets]\nkey_file = "{tmp / "secret.key"}"\n'
            '[admin]\nlisten = ["127.0.0.1:0"]\n[serve]\nworkers = 2\ngrace_period = 2.0\n'
            '[http]\nlisten = ["127.0.0.1:0"]\naccess_log = "off"\n'
            '[https]\nlisten = ["127.0.0.1:0"]\n'
            f'[acme]\nca_file = "{pebble_ca}"\npoll_interval = 0.5\nbackoff_base = 600.0\n'
            f'order_timeout = 30.0\n{extra}')


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("acme")
    backend = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    db_url = make_db(tmp / "directory.sqlite3")
    key = generate_key()
    (tmp / "secret.key").write_text(key + "\n")

    async def provision(service: DirectoryService) -> None:
        await service.add_host("web", "127.0.0.1", http_port=backend.server_address[1])
        await service.add_tenant("ta", "web")
        await service.add_tenant("tb", "web")

    # The edge's ports must be known before pebble starts (they are its validation ports);
    # pebble's own listener certificate is made first so the edge config can trust it.
    ca = tmp / "pebble" / "pebble-listener.pem"
    serve = EdgeServe(tmp, _config(tmp, db_url, ca, "enabled = true\non_demand = true\n"
                                   "on_demand_per_tenant = 2.0\n"),
                      env={"EDGE_PROXY_OVERRIDES": ""})
    pebble: Pebble | None = None
    try:
        serve.wait_line("admin")
        _, http_port = serve.wait_line("http")
        _, https_port = serve.wait_line("https")
        serve.wait_ready()
        pebble = Pebble(tmp / "pebble", http_port=http_port, tls_port=https_port)
        assert pebble.ca_file == ca
        (tmp / "root.pem").write_bytes(pebble.root_pem())
        environment = Env(tmp, db_url, key, serve, pebble, http_port, https_port,
                          tmp / "root.pem")
        environment.run(provision)
        (tmp / "alpn.toml").write_text(_config(tmp, db_url, ca, 'challenge = "tls-alpn-01"\n'))
        (tmp / "staging.toml").write_text(_config(tmp, db_url, ca, 'environment = "staging"\n'))
        result = environment.cli("acme", "account", "add", "pebble", "--directory",
                                 pebble.directory, "--email", "ops@example.com")
        assert result.returncode == 0, result.stderr
        yield environment
    finally:
        serve.kill()
        if pebble is not None:
            pebble.stop()
        backend.shutdown()
        backend.server_close()


def test_auto_cert_site_is_issued_by_edge_serve_and_served_by_every_worker(env: Env) -> None:
    """``site add --auto-cert``: the loop in ``edge serve`` orders it, pebble validates HTTP-01
    against the edge, and every worker serves the new certificate without a reload."""
    env.add_site("www.auto.test", "--auto-cert")
    wait_for(lambda: env.status()["www.auto.test"]["state"] == "valid", 30,
             "www.auto.test issued by edge serve")
    row = env.status()["www.auto.test"]
    assert row["orders"] == 1 and row["last_error"] == "" and row["account"] == "pebble"

    # Within about a second (one change-feed poll) every worker has it: 12 fresh connections
    # spread over the two workers by SO_REUSEPORT all verify against pebble's root.
    def all_served() -> bool:
        try:
            return all(env.served_certificate("www.auto.test") for _ in range(12))
        except (ssl.SSLError, OSError):
            return False
    wait_for(all_served, 3, "the certificate on every worker")
    leaf = env.served_certificate("www.auto.test")
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["www.auto.test"]
    assert leaf.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    # Renewal at 2/3 of the lifetime (pebble offers no ARI), spread by at most 10 %.
    lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    renew_at = time.mktime(time.strptime(row["renew_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    fraction = (renew_at - leaf.not_valid_before_utc.timestamp()) / lifetime
    assert 2 / 3 - 0.01 <= fraction <= 2 / 3 + 0.11
    curl = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--cacert", str(env.root), "--resolve",
         f"www.auto.test:{env.https_port}:127.0.0.1", f"https://www.auto.test:{env.https_port}/"],
        capture_output=True, text=True, timeout=30)
    assert curl.returncode == 0, curl.stderr
    assert curl.stdout == f"backend saw www.auto.test:{env.https_port}\n"


def test_http01_is_answered_before_redirects_and_filters(env: Env) -> None:
    """A site that denies the CA's address (and every path) and redirects to HTTPS still
    validates, and ``edge cert issue`` (RSA on request) reports the certificate id."""
    env.add_site("locked.test", "--https-redirect", "--filters",
                 json.dumps({"ip_deny": ["127.0.0.0/8"], "path_deny": [{"prefix": "/"}]}))
    result = env.cli("cert", "issue", "locked.test", "--key-type", "rsa2048")
    assert result.returncode == 0, result.stderr + env.pebble.log()[-2000:]
    assert result.stdout.startswith("locked.test: certificate ")
    leaf = env.served_certificate("locked.test")
    assert leaf.public_key().key_size == 2048  # type: ignore[union-attr]
    # The challenge path is not an open door: a token that is not the edge's own is an
    # ordinary request, refused by the site's filters like its other paths.
    for path in (f"/.well-known/acme-challenge/{'x' * 43}", "/index.html"):
        probe = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: locked.test",
             f"http://127.0.0.1:{env.http_port}{path}"], capture_output=True, text=True,
            timeout=20)
        assert probe.stdout == "403", path


def test_customer_certbot_on_the_backend_validates_through_the_edge(env: Env) -> None:
    """A customer runs certbot (HTTP-01, standalone) on their backend for a site without
    ``--auto-cert``: the CA's request for a token the edge did not publish reaches the
    backend like any request, and certbot gets its certificate. A Host the directory does not
    have still gets the edge's 404 (no route to anywhere through the challenge path)."""
    port = support_pebble.free_port()
    assert env.cli("host", "add", "custbox", "--address", "127.0.0.1", "--http-port",
                   str(port)).returncode == 0
    assert env.cli("tenant", "add", "tc", "--host", "custbox").returncode == 0
    env.add_site("own.test", tenant="tc")
    work = env.tmp / "certbot"
    certbot = subprocess.run(
        ["certbot", "certonly", "--standalone", "--non-interactive", "--agree-tos",
         "--register-unsafely-without-email", "--server", env.pebble.directory,
         "--http-01-address", "127.0.0.1", "--http-01-port", str(port), "-d", "own.test",
         "--config-dir", str(work), "--work-dir", str(work), "--logs-dir", str(work)],
        env={**os.environ, "REQUESTS_CA_BUNDLE": str(env.pebble.ca_file)},
        capture_output=True, text=True, timeout=150)
    assert certbot.returncode == 0, certbot.stdout + certbot.stderr
    chain = (work / "live" / "own.test" / "fullchain.pem").read_bytes()
    leaf = x509.load_pem_x509_certificate(chain)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["own.test"]
    assert "own.test" not in env.status()  # the edge never took it over
    probe = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: nosuch.test",
         f"http://127.0.0.1:{env.http_port}/.well-known/acme-challenge/{'y' * 43}"],
        capture_output=True, text=True, timeout=20)
    assert probe.stdout == "404"


def test_tls_alpn01_validation_through_the_https_listener(env: Env) -> None:
    env.add_site("alpn.test")
    result = env.cli("cert", "issue", "alpn.test", config="alpn.toml")
    assert result.returncode == 0, result.stderr + env.pebble.log()[-2000:]
    assert env.served_certificate("alpn.test").subject


def test_renewal_is_served_without_dropping_an_open_connection(env: Env) -> None:
    env.add_site("renew.test")
    assert env.cli("cert", "issue", "renew.test").returncode == 0
    before = env.served_certificate("renew.test")
    ctx = ssl.create_default_context(cafile=str(env.root))
    with socket.create_connection(("127.0.0.1", env.https_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="renew.test") as tls:
        request = b"GET / HTTP/1.1\r\nHost: renew.test\r\n\r\n"
        tls.sendall(request)
        assert b"backend saw renew.test" in _read_response(tls)
        result = env.cli("cert", "renew", "renew.test")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: env.served_certificate("renew.test").serial_number
                 != before.serial_number, 5, "the renewed certificate served")
        tls.sendall(request)  # the open connection goes on with its old session
        assert b"backend saw renew.test" in _read_response(tls)
    assert env.status()["renew.test"]["orders"] == 2


def _read_response(tls: ssl.SSLSocket) -> bytes:
    """One whole response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body


def test_revoke_at_the_ca(env: Env) -> None:
    """``edge cert revoke``: the CA marks the certificate revoked, and the name falls due so
    ``edge serve``'s loop replaces it."""
    env.add_site("revoke.test")
    assert env.cli("cert", "issue", "revoke.test").returncode == 0
    serial = env.served_certificate("revoke.test").serial_number
    assert env.pebble.certificate_status(serial) == "Valid"
    result = env.cli("cert", "revoke", "revoke.test")
    assert result.returncode == 0, result.stderr
    assert "revoked" in result.stdout
    assert env.pebble.certificate_status(serial) == "Revoked"
    wait_for(lambda: env.served_certificate("revoke.test").serial_number != serial, 20,
             "a new certificate after the revocation")


def test_rejected_validation_backs_off_and_shows_the_ca_error(env: Env) -> None:
    env.pebble.add_a("dead.test", "127.0.0.2")  # nothing listens there: validation fails
    orders = env.pebble.orders()
    env.add_site("dead.test", "--auto-cert")
    wait_for(lambda: env.status()["dead.test"]["state"] == "failing", 30, "dead.test failing")
    row = env.status()["dead.test"]
    assert row["failures"] == 1 and row["next_attempt"] is not None
    assert "dead.test" in row["last_error"] and "connection" in row["last_error"].lower()
    failing = env.cli("cert", "status", "--failing")
    assert "dead.test" in failing.stdout and "www.auto.test" not in failing.stdout
    time.sleep(2)  # four loop rounds: the back-off (600 s) keeps it from ordering again
    assert env.pebble.orders() == orders + 1
    assert env.status()["dead.test"]["orders"] == 1


def test_ca_down_keeps_the_old_certificate_and_falls_back(env: Env) -> None:
    """A primary CA that is down: the account backs off, the fallback CA issues; with no CA
    reachable at all the name fails and the old certificate stays served."""
    env.add_site("fallback.test")
    assert env.cli("cert", "issue", "fallback.test").returncode == 0
    old = env.served_certificate("fallback.test")
    down = f"https://127.0.0.1:{support_pebble.free_port()}/dir"

    async def add_down(service: DirectoryService) -> None:
        from edge.acme.client import new_private_key

        await service.add_acme_account("down-primary", down, new_private_key("ec256"),
                                       account_url=down + "/acct/1", priority=-1)
        await service.add_acme_account("down-staging", down, new_private_key("ec256"),
                                       account_url=down + "/acct/2", environment="staging")
    env.run(add_down)
    try:
        # Staging has only the dead CA: the renewal fails, the old certificate stays.
        result = env.cli("cert", "renew", "fallback.test", config="staging.toml")
        assert result.returncode != 0 and "CA unreachable" in result.stderr, result.stderr
        assert env.served_certificate("fallback.test").serial_number == old.serial_number
        assert env.status()["fallback.test"]["state"] == "failing"
        # Production: the dead primary is skipped after its failure, pebble issues.
        result = env.cli("cert", "renew", "fallback.test")
        assert result.returncode == 0, result.stderr
        accounts = {a["name"]: a for a in json.loads(
            env.cli("acme", "account", "list", "--json").stdout)}
        assert accounts["down-primary"]["backoff_seconds"] > 0
        assert "CA unreachable" in accounts["down-primary"]["last_error"]
        wait_for(lambda: env.served_certificate("fallback.test").serial_number
                 != old.serial_number, 5, "the fallback CA's certificate served")
    finally:
        async def remove(service: DirectoryService) -> None:
            async with service.store.transaction() as tx:
                await tx.execute("DELETE FROM acme_accounts WHERE name LIKE 'down-%'")
        env.run(remove)


@contextlib.contextmanager
def _front_account(env: Env, name: str, *flags: str) -> Iterator[CAFront]:
    """An account registered at a :class:`CAFront` of pebble; removed afterwards."""
    front = CAFront(env.pebble)
    try:
        result = env.cli("acme", "account", "add", name, "--directory", front.directory, *flags)
        assert result.returncode == 0, result.stderr
        yield front
    finally:
        async def remove(service: DirectoryService) -> None:
            async with service.store.transaction() as tx:
                await tx.execute("DELETE FROM acme_accounts WHERE name = ?", (name,))
        env.run(remove)
        front.stop()


def _seconds_until(iso_text: str) -> float:
    return time.mktime(time.strptime(iso_text, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone - time.time()


def test_ca_retry_after_is_honoured_and_shown(env: Env) -> None:
    """A CA that refuses new orders (429 rateLimited, then 503) with ``Retry-After``: the
    name and the account wait as long as the CA asks (seconds or an HTTP date), and
    ``edge cert status`` / ``acme account list`` show it (they used to wait a fixed hour for
    429 and the name's own 10-minute back-off, whatever the CA said)."""
    with _front_account(env, "busy-ca", "--staging") as front:
        env.add_site("busy.test")
        front.refusal = Refusal(429, "7200")
        result = env.cli("cert", "issue", "busy.test", config="staging.toml")
        assert result.returncode != 0 and "rateLimited" in result.stderr, result.stderr
        assert "retry after 7200 s" in result.stderr
        row = env.status()["busy.test"]
        assert row["state"] == "failing" and "retry after 7200 s" in row["last_error"]
        assert 7100 < _seconds_until(row["next_attempt"]) <= 7200
        accounts = {a["name"]: a for a in json.loads(
            env.cli("acme", "account", "list", "--json").stdout)}
        assert 7100 < accounts["busy-ca"]["backoff_seconds"] <= 7200

        # `cert issue` does not wait for the name's back-off (edge serve's loop does).
        env.run(lambda service: service.record_acme_account_result("busy-ca"))
        later = email.utils.formatdate(time.time() + 5000, usegmt=True)
        front.refusal = Refusal(503, later, problem="urn:ietf:params:acme:error:serverInternal")
        result = env.cli("cert", "issue", "busy.test", config="staging.toml")
        assert result.returncode != 0 and "serverInternal" in result.stderr, result.stderr
        row = env.status()["busy.test"]
        assert 4900 < _seconds_until(row["next_attempt"]) <= 5000, row
        assert front.new_orders == []  # nothing reached pebble


def test_authorization_polling_waits_as_the_ca_asks(env: Env) -> None:
    """A CA that answers ``pending`` with ``Retry-After: 3`` is asked again after three
    seconds, not sooner (``acme``'s own loop polls every second whatever the CA says)."""
    with _front_account(env, "slow-ca", "--staging") as front:
        env.add_site("slowca.test")
        front.hold_authorizations = "3"
        result = env.cli("cert", "issue", "slowca.test", config="staging.toml")
        assert result.returncode == 0, result.stderr
        polls = front.authorization_polls
        held = [i for i, (_, was_held) in enumerate(polls) if was_held]
        assert len(held) == 1 and held[0] + 1 < len(polls), polls
        assert polls[held[0] + 1][0] - polls[held[0]][0] >= 2.9


def test_bulk_load_auto_cert_sites_get_certificates(env: Env) -> None:
    """``edge bulk-load FILE --auto-cert``: edge serve's loop issues the loaded sites."""
    path = env.tmp / "bulk.jsonl"
    path.write_text("".join(json.dumps({"kind": "site", "hostname": name, "tenant": "ta"}) + "\n"
                            for name in ("bulk1.test", "bulk2.test")))
    result = env.cli("bulk-load", str(path), "--auto-cert")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: all(env.status().get(n, {}).get("state") == "valid"
                         for n in ("bulk1.test", "bulk2.test")), 40, "bulk-loaded sites issued")
    wait_for(lambda: env.served_certificate("bulk2.test"), 5, "bulk2.test served")


def _window(start: float, end: float) -> dict[str, Any]:
    def rfc3339(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
    return {"suggestedWindow": {"start": rfc3339(start), "end": rfc3339(end)}}


def test_renewal_information_moves_renewal_and_the_order_says_what_it_replaces(
        env: Env) -> None:
    """ACME Renewal Information (RFC 9773), from a CA front (Debian's pebble 2.4 has none):
    the renewal time is in the CA's window; edge serve asks again when the answer's
    ``Retry-After`` says (an hour: not before; a second: soon); a window moved into the past
    makes the name fall due long before 2/3 of its lifetime, and the renewal order carries
    ``replaces`` with the old certificate's ARI id."""
    day = 86400.0
    with _front_account(env, "ari-ca", "--priority", "-5") as front:
        now = time.time()
        front.renewal_info = _window(now + 30 * day, now + 31 * day)
        front.renewal_retry_after = 3600
        env.add_site("ari-a.test")
        assert env.cli("cert", "issue", "ari-a.test").returncode == 0
        row = env.status()["ari-a.test"]
        assert 30 * day - 60 < _seconds_until(row["renew_at"]) < 31 * day
        assert 3500 < _seconds_until(row["renewal_info_check"]) <= 3600
        (a_id,) = front.renewal_requests

        front.renewal_retry_after = 1
        env.add_site("ari-b.test")
        assert env.cli("cert", "issue", "ari-b.test").returncode == 0
        old_b = env.served_certificate("ari-b.test")
        b_id = front.renewal_requests[-1]
        assert b_id != a_id and front.new_orders[-1].get("replaces") is None
        # e.g. ahead of a revocation (for that certificate only: its successor gets the
        # ordinary window, or it would fall due again at once)
        front.renewal_info_for[b_id] = _window(now - 2 * 3600, now - 3600)
        wait_for(lambda: env.status()["ari-b.test"]["orders"] == 2
                 and env.status()["ari-b.test"]["state"] == "valid", 30, "ari-b.test renewed")
        wait_for(lambda: env.served_certificate("ari-b.test").serial_number
                 != old_b.serial_number, 5, "the renewed certificate served")
        assert front.new_orders[-1]["replaces"] == b_id
        assert front.renewal_requests.count(a_id) == 1  # its Retry-After (an hour) holds
        assert env.status()["ari-a.test"]["orders"] == 1


def test_two_edge_processes_racing_for_one_name_place_one_order(env: Env) -> None:
    """``edge serve``'s loop and two ``edge cert renew --due`` processes all find the new
    name due at once; the lease lets exactly one of them order it."""
    env.add_site("race.test")
    orders = env.pebble.orders()
    env.run(lambda service: service.enable_auto_cert("race.test"))
    procs = [subprocess.Popen(
        [sys.executable, "-c", "import sys; from edge.cli.main import main; sys.exit(main())",
         "cert", "renew", "--due", "--config", str(env.tmp / "edge.toml")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    wait_for(lambda: env.status()["race.test"]["state"] == "valid", 20, "race.test valid")
    time.sleep(1.0)  # two more loop rounds: nobody orders it again
    assert env.pebble.orders() == orders + 1, outputs
    assert env.status()["race.test"]["orders"] == 1, outputs


def test_random_sni_flood_causes_no_acme_order(env: Env) -> None:
    orders = env.pebble.orders()
    ctx = ssl.create_default_context(cafile=str(env.root))
    refused = 0
    for _ in range(200):
        name = secrets.token_hex(6) + ".flood.test"
        try:
            with socket.create_connection(("127.0.0.1", env.https_port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=name):
                pass
        except ssl.SSLError as exc:
            assert "UNRECOGNIZED_NAME" in str(exc).upper()
            refused += 1
    assert refused == 200
    time.sleep(1.5)  # three rounds of edge serve's loop
    assert env.pebble.orders() == orders
    assert "flood.test" not in json.dumps(env.status())


def test_random_sni_under_a_wildcard_site_spends_no_on_demand_budget(env: Env) -> None:
    """A wildcard site without certificate (``*.wild.test``) matches every random name under
    it, but ACME cannot issue a wildcard here (DNS-01 only): a flood of such names must neither
    order anything nor use up the tenant's on-demand rate limit, so the tenant's next real site
    still gets its certificate at its first handshake (it used to be refused: rate limit)."""
    result = env.cli("tenant", "add", "tw", "--host", "web")
    assert result.returncode == 0, result.stderr
    env.add_site("*.wild.test", tenant="tw")
    orders = env.pebble.orders()
    ctx = ssl.create_default_context(cafile=str(env.root))
    for _ in range(12):  # six per worker: three times the per-tenant burst of two
        name = secrets.token_hex(6) + ".wild.test"
        with contextlib.suppress(ssl.SSLError), \
                socket.create_connection(("127.0.0.1", env.https_port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=name):
            raise AssertionError(f"{name}: a handshake without any certificate for it")
    assert env.pebble.orders() == orders
    env.add_site("after-wild.test", tenant="tw")
    for _ in range(4):  # whichever worker takes the connection: each has its budget left
        leaf = env.served_certificate("after-wild.test")
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["after-wild.test"]
    wait_for(lambda: env.status()["after-wild.test"]["state"] == "valid", 30,
             "after-wild.test valid")
    time.sleep(1.0)  # two rounds of edge serve's loop: nothing more is ordered
    assert env.pebble.orders() == orders + 1, env.status()["after-wild.test"]


def test_on_demand_first_handshake_waits_for_its_certificate(env: Env) -> None:
    """A site in the directory without certificate: the first client's handshake waits while
    the edge orders one (``[acme] on_demand``), then completes with it."""
    env.add_site("first.test")
    orders = env.pebble.orders()
    leaf = env.served_certificate("first.test")
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["first.test"]
    assert env.pebble.orders() == orders + 1
    assert env.status()["first.test"]["state"] == "valid"  # and renewed like --auto-cert


def test_handshakes_right_after_on_demand_issuance_spend_no_budget(env: Env) -> None:
    """Until the change feed brings an on-demand certificate to a worker's cache (about a
    second), that worker's next handshakes for the name used to start on-demand again, spend
    the tenant's budget (two) and then fail with internal_error."""
    assert env.cli("tenant", "add", "tq", "--host", "web").returncode == 0
    env.add_site("burst.test", tenant="tq")
    first = env.served_certificate("burst.test").serial_number
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        serials = set(pool.map(lambda _: env.served_certificate("burst.test").serial_number,
                               range(12)))
    assert serials == {first}


def test_on_demand_is_rate_limited_per_tenant(env: Env) -> None:
    """``on_demand_per_tenant = 2`` per minute, fleet-wide: of six new sites of one tenant
    exactly two get a certificate at their first handshake, whichever of the two workers
    takes them (it used to be two per worker: up to four); the others get the alert
    internal_error and cost no order."""
    hosts = [f"s{i}.tb.test" for i in range(6)]
    for host in hosts:
        env.add_site(host, tenant="tb")
    orders = env.pebble.orders()
    issued = refused = 0
    for host in hosts:
        try:
            env.served_certificate(host)
            issued += 1
        except ssl.SSLError as exc:
            assert "INTERNAL_ERROR" in str(exc).upper(), exc
            refused += 1
    assert issued == 2 and refused == 4
    assert env.pebble.orders() == orders + issued


def test_external_account_binding(env: Env) -> None:
    """A CA that requires EAB (pebble configured like ZeroSSL): refused without, with a clear
    message; registered with ``--eab-kid``/``--eab-hmac``; the key id is kept."""
    hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
    eab = Pebble(env.tmp / "pebble-eab", http_port=env.http_port, tls_port=env.https_port,
                 eab={"kid-1": hmac})
    try:
        (env.tmp / "eab.toml").write_text(_config(env.tmp, env.db_url, eab.ca_file))
        refused = env.cli("acme", "account", "add", "zero", "--directory", eab.directory,
                          config="eab.toml")
        assert refused.returncode != 0 and "External Account Binding" in refused.stderr
        wrong = env.cli("acme", "account", "add", "zero", "--directory", eab.directory,
                        "--eab-kid", "kid-1", "--eab-hmac", "A" * 64, config="eab.toml")
        assert wrong.returncode != 0 and "registering at" in wrong.stderr, wrong.stderr
        ok = env.cli("acme", "account", "add", "zero", "--directory", eab.directory,
                     "--eab-kid", "kid-1", "--eab-hmac", hmac, "--priority", "50",
                     config="eab.toml")
        assert ok.returncode == 0, ok.stderr
        accounts = {a["name"]: a for a in json.loads(
            env.cli("acme", "account", "list", "--json").stdout)}
        assert accounts["zero"]["eab"] is True and accounts["zero"]["priority"] == 50
    finally:
        eab.stop()

        async def remove(service: DirectoryService) -> None:
            async with service.store.transaction() as tx:
                await tx.execute("DELETE FROM acme_accounts WHERE name = 'zero'")
        env.run(remove)


def test_policy_marks_every_new_site_auto_cert(env: Env) -> None:
    (env.tmp / "policy.toml").write_text(_config(env.tmp, env.db_url, env.pebble.ca_file,
                                                 "auto_cert_new_sites = true\n"))
    assert env.cli("site", "add", "policy.test", "--tenant", "ta",
                   config="policy.toml").returncode == 0
    assert env.cli("site", "add", "*.policy.test", "--tenant", "ta",
                   config="policy.toml").returncode == 0
    assert env.cli("site", "add", "nopolicy.test", "--tenant", "ta").returncode == 0
    status = env.status()
    assert "policy.test" in status and "*.policy.test" not in status
    assert "nopolicy.test" not in status


def test_metrics_show_orders_and_failing_names(env: Env) -> None:
    """What edge serve's loop did is in /metrics: issued orders, the CA's validation refusals,
    names by state (the failing dead.test from the back-off test), on-demand handshakes."""
    from tests.test_serve import http_get, metric_value

    def text() -> str:
        status, body = http_get(env.serve.url("/metrics"))
        assert status == 200
        return body

    def line(body: str, name: str, label: str) -> float:
        return metric_value("\n".join(x for x in body.splitlines() if label in x), name)

    body = wait_for(lambda: (lambda b: b if line(b, "edge_acme_names", 'state="failing"') >= 1
                             else None)(text()), 15, "edge_acme_names in /metrics")
    assert line(body, "edge_acme_orders_total", 'outcome="issued"') >= 1
    assert line(body, "edge_acme_orders_total", 'outcome="validation"') >= 1
    assert line(body, "edge_acme_names", 'state="valid"') >= 5
    assert line(body, "edge_https_handshakes_total", 'outcome="on_demand"') >= 1
