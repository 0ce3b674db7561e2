"""HTTPS under the real process model: ``edge serve`` with two pre-forked uvloop workers,
certificates from an encrypted SQLite directory, curl through TLS and the HTTP engine to a
backend, metrics summed by the master, a clean SIGTERM."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge.directory.secrets import KeyBox, generate_key
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from tests.support_directory import make_certificate
from tests.test_serve import EdgeServe, http_get, make_db, metric_value, wait_for

pytestmark = pytest.mark.timeout(120)


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"backend saw {self.headers['Host']} proto={self.headers['X-Forwarded-Proto']}\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_https_under_edge_serve_with_two_workers(tmp_path: Path, backend: int) -> None:
    db_url = make_db(tmp_path / "directory.sqlite3")
    key = generate_key()
    (tmp_path / "secret.key").write_text(key + "\n")
    chain, private = make_certificate(["www.a.test", "*.a.test"], common_name="www.a.test")
    (tmp_path / "ca.pem").write_bytes(chain)

    async def provision() -> None:
        store = store_for_url(db_url)
        await store.open()
        service = DirectoryService(store, KeyBox.from_text(key))
        await service.add_host("web", "127.0.0.1", http_port=backend)
        await service.add_tenant("ta", "web")
        cert_id = await service.import_certificate(chain, private)
        await service.add_site("www.a.test", "ta", certificate_id=cert_id)
        await service.add_site("*.a.test", "ta", certificate_id=cert_id)
        await store.close()

    asyncio.run(provision())
    config = (f'[database]\nurl = "{db_url}"\n[secrets]\nkey_file = "{tmp_path / "secret.key"}"\n'
              '[admin]\nlisten = ["127.0.0.1:0"]\n[serve]\nworkers = 2\ngrace_period = 5.0\n'
              '[http]\naccess_log = "off"\n[https]\nlisten = ["127.0.0.1:0"]\n')
    server = EdgeServe(tmp_path, config, env={"EDGE_PROXY_OVERRIDES": ""})
    try:
        server.wait_line("admin")
        _, port = server.wait_line("https")
        server.wait_ready()

        def curl(name: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["curl", "-sS", "--max-time", "30", "--cacert", str(tmp_path / "ca.pem"),
                 "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/"],
                capture_output=True, text=True, timeout=40)

        for name in ["www.a.test"] * 8:  # (wildcard sites: see test_http_tls_e2e.py)
            result = curl(name)
            assert result.returncode == 0, (result.stderr, server.log())
            assert result.stdout == f"backend saw {name}:{port} proto=https\n"
        refused = curl("unknown.test")
        assert refused.returncode == 35 and "unrecognized name" in refused.stderr.lower()

        def handshakes() -> float:
            status, text = http_get(server.url("/metrics"))
            assert status == 200
            lines = [line for line in text.splitlines() if 'outcome="ok"' in line]
            return metric_value("\n".join(lines), "edge_https_handshakes_total")

        wait_for(lambda: handshakes() >= 8, 15, "8 handshakes in /metrics")
        assert server.stop() == 0
    finally:
        server.kill()
