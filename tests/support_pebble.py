"""A real ACME CA for tests: :class:`edge.acme.pebble.Pebble` (also used by ``edge demo`` and
``benchmarks/acme.py``), re-exported here, and :class:`CAFront`, an HTTPS front for it with
what Debian's pebble 2.4 lacks: ACME Renewal Information (RFC 9773) and the refusals of a
busy CA (429/503 with ``Retry-After``).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge.acme.pebble import Pebble, available, free_port

__all__ = ["CAFront", "Pebble", "Refusal", "available", "free_port"]

_HOP_HEADERS = {"connection", "transfer-encoding", "content-length", "keep-alive"}


@dataclass(frozen=True, slots=True)
class Refusal:
    """How the front answers new orders while set: a problem document with this status."""

    status: int
    retry_after: str
    problem: str = "urn:ietf:params:acme:error:rateLimited"


class CAFront:
    """pebble behind a reverse proxy on its own port (its listener certificate, so clients
    trust it with the same ``ca_file``). The Host header is passed on, and pebble builds every
    URL from it, so clients that start at :attr:`directory` stay on the front.

    * ``renewal_info``: when set, the directory offers ``renewalInfo`` and the front answers
      ``GET renewal-info/ID`` with it (and ``Retry-After: renewal_retry_after``);
    * ``refusal``: when set, new orders are refused with it (nothing reaches pebble);
    * ``new_orders``: the JSON payloads of the new-order requests that passed (``replaces``);
    * ``hold_authorizations``: when set, the first time an authorization is valid the front
      still says ``pending``, with this ``Retry-After``; ``authorization_polls`` has the
      (monotonic) time of every request for an authorization and whether it was held.
    """

    def __init__(self, pebble: Pebble) -> None:
        self.pebble = pebble
        self.renewal_info: dict[str, Any] | None = None
        self.renewal_info_for: dict[str, dict[str, Any]] = {}
        """Answers for single certificates (by ARI id), instead of ``renewal_info``."""
        self.renewal_retry_after = 21600
        self.renewal_requests: list[str] = []
        self.refusal: Refusal | None = None
        self.new_orders: list[dict[str, Any]] = []
        self.hold_authorizations: str | None = None
        self.authorization_polls: list[tuple[float, bool]] = []
        self._held: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pebble.ca_file, pebble.workdir / "pebble-listener.key")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def hold(self, path: str, headers: list[tuple[str, str]],
             body: bytes) -> tuple[list[tuple[str, str]], bytes]:
        """An authorization answer, turned ``pending`` once (see ``hold_authorizations``)."""
        authz = json.loads(body)
        held = (self.hold_authorizations is not None and authz.get("status") == "valid"
                and path not in self._held)
        self.authorization_polls.append((time.monotonic(), held))
        if not held:
            return headers, body
        self._held.add(path)
        authz["status"] = "pending"
        assert self.hold_authorizations is not None
        return [*headers, ("Retry-After", self.hold_authorizations)], json.dumps(authz).encode()

    def forward(self, method: str, path: str, headers: dict[str, str],
                body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        ctx = ssl.create_default_context(cafile=str(self.pebble.ca_file))
        conn = http.client.HTTPSConnection("127.0.0.1", self.pebble.port, context=ctx,
                                           timeout=30)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()


def _jws_payload(body: bytes) -> dict[str, Any]:
    payload = json.loads(body)["payload"]
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)) or b"{}")
    return decoded if isinstance(decoded, dict) else {}


def _handler(front: CAFront) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._serve("GET")

        def do_HEAD(self) -> None:
            self._serve("HEAD")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.path.startswith("/renewal-info/") and front.renewal_info is not None:
                certificate = self.path.rsplit("/", 1)[1]
                front.renewal_requests.append(certificate)
                info = front.renewal_info_for.get(certificate, front.renewal_info)
                self._reply(200, [("Content-Type", "application/json"),
                                  ("Retry-After", str(front.renewal_retry_after))],
                            json.dumps(info).encode())
                return
            if self.path == "/order-plz" and method == "POST":
                refusal = front.refusal
                if refusal is not None:
                    problem = {"type": refusal.problem, "detail": "too many new orders"}
                    self._reply(refusal.status, [
                        ("Content-Type", "application/problem+json"),
                        ("Retry-After", refusal.retry_after)], json.dumps(problem).encode())
                    return
                front.new_orders.append(_jws_payload(body))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            status, out_headers, out = front.forward(method, self.path, headers, body)
            if self.path.startswith("/authZ/"):
                out_headers, out = front.hold(self.path, out_headers, out)
            if self.path == "/dir" and front.renewal_info is not None:
                directory = json.loads(out)
                directory["renewalInfo"] = f"https://{self.headers['Host']}/renewal-info"
                out = json.dumps(directory).encode()
            self._reply(status, [(k, v) for k, v in out_headers
                                 if k.lower() not in _HOP_HEADERS], out)

        def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler
