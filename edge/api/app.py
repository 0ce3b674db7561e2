"""The admin API: JSON over HTTP on the same service layer as the CLI.

Every route is described in :mod:`edge.api.openapi`; :func:`_endpoint` looks up the route's
operation there and, from it alone, checks the bearer token's scope (``x-scope``), the query
parameters and the JSON body, so a handler only sees checked input. Writes go through
:class:`~edge.directory.service.DirectoryService` exactly as ``edge ...`` commands do; errors
map to statuses by type (:data:`STATUS_BY_ERROR`).

Authentication: ``Authorization: Bearer <token>`` (``edge token add``). The web console's
cookie is accepted for reads only, so no cross-site form can make the API write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from aiohttp import web

from edge.api import operations as opview
from edge.api import validate
from edge.api.idempotency import IdempotencyKeys, request_digest
from edge.api.live import EdgeUnreachable, call_edge
from edge.api.openapi import IDEMPOTENCY, PREFIX, document
from edge.cli.output import to_jsonable
from edge.directory.model import PROTOCOLS, ChangeRecord, Site, StoredCertificate
from edge.directory.names import normalize_hostname
from edge.directory.secrets import KeyBox
from edge.directory.service import DEFAULT_MOVE_DRAIN, DirectoryService, iso
from edge.directory.store import SQLStore
from edge.directory.tokens import Token, TokenService
from edge.errors import (
    ConflictError,
    DirectoryUnavailable,
    EdgeError,
    NotFoundError,
    SecretsError,
    ValidationError,
)
from edge.liveapi import token_of
from edge.operations import BULK_LOAD, DrainOptions, Operations

log = logging.getLogger("edge.api")

COOKIE = "edge_console"
"""The console's login cookie (holds the token; HttpOnly, SameSite=Strict)."""

STATUS_BY_ERROR: tuple[tuple[type[EdgeError], int], ...] = (
    (validate.BadRequest, 400), (ValidationError, 422), (NotFoundError, 404),
    (ConflictError, 409), (DirectoryUnavailable, 503), (SecretsError, 503),
    (EdgeUnreachable, 503))


@dataclass
class ApiState:
    """What every handler shares: the store, the services over it, running operations."""

    store: SQLStore
    keybox: KeyBox | None
    edge_admin: str = ""
    """Base URL of this machine's ``edge serve`` admin listener ("" = none)."""
    edge_token: str | None = field(init=False)
    """Its bearer token, from the same secret key (None without one: it answers 401)."""
    tokens: TokenService = field(init=False)
    idempotency: IdempotencyKeys = field(init=False)
    runner: opview.Runner = field(init=False)
    doc: dict[str, Any] = field(default_factory=document)
    doc_json: bytes = field(init=False)
    """The document serialised once (it does not change while the process runs)."""

    def __post_init__(self) -> None:
        self.doc_json = json.dumps(self.doc).encode()
        self.edge_token = token_of(self.keybox) if self.keybox is not None else None
        self.tokens = TokenService(self.store)
        self.idempotency = IdempotencyKeys(self.store)
        self.runner = opview.Runner(Operations(self.store))

    def service(self, token: Token) -> DirectoryService:
        """The service writing as ``api:<token name>`` (the actor of its change rows)."""
        return DirectoryService(self.store, self.keybox, actor=f"api:{token.name}")

    def operations(self, token: Token) -> Operations:
        return Operations(self.store, self.service(token))


STATE = web.AppKey("state", ApiState)


@dataclass(frozen=True, slots=True)
class Call:
    """A checked request, as handlers see it."""

    state: ApiState
    request: web.Request
    token: Token
    match: dict[str, str]
    query: dict[str, Any]
    body: dict[str, Any]

    def service(self) -> DirectoryService:
        return self.state.service(self.token)

    def operations(self) -> Operations:
        return self.state.operations(self.token)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Call], Awaitable[Reply]]


class AuthError(EdgeError):
    """401 (``status``) or 403."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_status(exc: EdgeError) -> int:
    if isinstance(exc, AuthError):
        return exc.status
    return next((status for kind, status in STATUS_BY_ERROR if isinstance(exc, kind)), 500)


def json_response(reply: Reply) -> web.Response:
    if reply.status == 204:
        return web.Response(status=204, headers=reply.headers)
    return web.Response(status=reply.status, text=json.dumps(to_jsonable(reply.body)),
                        content_type="application/json", headers=reply.headers)


async def authenticate(request: web.Request, state: ApiState, scope: str) -> Token:
    """The token allowed to make this request; raises AuthError (401/403) otherwise."""
    header = request.headers.get("Authorization", "")
    via_cookie = not header and COOKIE in request.cookies
    secret = header[7:].strip() if header[:7].lower() == "bearer " else (
        request.cookies.get(COOKIE, "") if via_cookie else "")
    token = await state.tokens.verify(secret) if secret else None
    if token is None:
        raise AuthError(401, "a valid bearer token is required (edge token add NAME --scope ...)")
    if via_cookie and request.method not in ("GET", "HEAD"):
        raise AuthError(401, "the console cookie is for reading; writes need a bearer token")
    if not token.allows(scope):
        raise AuthError(403, f"token {token.name!r} lacks the {scope!r} scope this route needs")
    return token


def _endpoint(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        operation = state.doc["paths"][request.match_info.route.resource.canonical][  # type: ignore[union-attr]
            request.method.lower()]
        try:
            token = await authenticate(request, state, operation["x-scope"])
            limit = validate.MAX_BULK_BODY if handler is bulk_load else validate.MAX_BODY
            raw = await request.content.read(limit + 1)
            if len(raw) > limit:
                raise validate.BadRequest(f"request body is larger than {limit} bytes")
            call = Call(state, request, token, dict(request.match_info),
                        validate.query(operation, request.query), validate.body(operation, raw))
            key = request.headers.get("Idempotency-Key")
            if key is None or request.method == "GET":
                reply = await _run(handler, call)
            else:
                validate.check(IDEMPOTENCY["schema"], key, "header.Idempotency-Key")
                reply = await _idempotent(handler, call, key,
                                          request_digest(request.method, request.path_qs, raw))
        except EdgeError as exc:
            reply = Reply(error_status(exc), {"error": str(exc)})
            if reply.status == 401:
                reply.headers["WWW-Authenticate"] = 'Bearer realm="edge"'
        if isinstance(reply.body, web.StreamResponse):
            return reply.body
        return json_response(reply)

    return handle


async def _run(handler: Handler, call: Call) -> Reply:
    try:
        return await handler(call)
    except EdgeError:
        raise
    except Exception:
        log.exception("admin API handler failed")
        return Reply(500, {"error": "internal error (logged by the API server)"})


async def _idempotent(handler: Handler, call: Call, key: str, digest: str) -> Reply:
    keys = call.state.idempotency
    stored = await keys.begin(call.token.name, key, digest)
    if stored is not None:
        return Reply(stored.status, json.loads(stored.body) if stored.body else None,
                     {"Idempotency-Replayed": "true"})
    try:
        reply = await _run(handler, call)
    except EdgeError as exc:
        reply = Reply(error_status(exc), {"error": str(exc)})
    body = "" if reply.body is None else json.dumps(to_jsonable(reply.body))
    await keys.finish(call.token.name, key, reply.status, body)
    return reply


# -- views ------------------------------------------------------------------------------------

def certificate_view(cert: StoredCertificate, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {"id": cert.id, "fingerprint": cert.fingerprint, "names": list(cert.names),
            "not_before": iso(cert.not_before), "not_after": iso(cert.not_after),
            "expired": cert.not_after <= now}


async def _site(store: SQLStore, hostname: str) -> Site:
    name = normalize_hostname(hostname, allow_wildcard=True)
    site, _ = await store.fetch_site_pair(name, None)
    if site is None:
        raise NotFoundError(f"site {name!r} does not exist")
    return site


def _paging(call: Call) -> dict[str, Any]:
    return {"after": call.query.get("after", ""), "limit": call.query.get("limit", 1000)}


# -- handlers (one per documented operation) ------------------------------------------------

async def list_hosts(call: Call) -> Reply:
    return Reply(200, await call.state.store.list_hosts())


async def add_host(call: Call) -> Reply:
    host = await call.service().add_host(**call.body)
    return Reply(201, host, {"Location": f"{PREFIX}/hosts/{host.name}"})


async def show_host(call: Call) -> Reply:
    return Reply(200, await call.service().get_host(call.match["name"]))


async def change_host(call: Call) -> Reply:
    return Reply(200, await call.service().update_host(call.match["name"], **call.body))


async def remove_host(call: Call) -> Reply:
    await call.service().remove_host(call.match["name"])
    return Reply(204)


async def list_tenants(call: Call) -> Reply:
    return Reply(200, await call.state.store.list_tenants(host=call.query.get("host"),
                                                          **_paging(call)))


async def add_tenant(call: Call) -> Reply:
    tenant = await call.service().add_tenant(call.body["name"], call.body["host"])
    return Reply(201, tenant, {"Location": f"{PREFIX}/tenants/{tenant.name}"})


async def tenant_detail(state: ApiState, name: str) -> dict[str, Any]:
    """A tenant with its accounts, sites and recent changes (the API and the console)."""
    store = state.store
    tenant = await store.fetch_tenant(name)
    if tenant is None:
        raise NotFoundError(f"tenant {name!r} does not exist")
    accounts = await store.list_accounts(tenant=tenant.name, limit=1000)
    sites = await store.list_sites(tenant=tenant.name, limit=1000)
    changes = await store.changes_about({"tenant": [tenant.name],
                                         "account": [a.username for a in accounts],
                                         "site": [s.hostname for s in sites],
                                         "purge": [s.hostname for s in sites]})
    return {"tenant": tenant, "accounts": accounts, "sites": sites,
            "changes": [change_view(c) for c in changes]}


async def show_tenant(call: Call) -> Reply:
    return Reply(200, await tenant_detail(call.state, call.match["name"]))


async def set_tenant_state(call: Call) -> Reply:
    return Reply(200, await call.service().set_tenant_state(call.match["name"],
                                                                  call.body["state"]))


async def remove_tenant(call: Call) -> Reply:
    removed = await call.service().remove_tenant(call.match["name"],
                                                 cascade=call.query.get("cascade") == "true")
    return Reply(200, {"removed": call.match["name"], "also_removed": removed})


async def move_tenant(call: Call) -> Reply:
    op = await call.operations().move_tenant(
        call.match["name"], call.body["to"],
        drain=float(call.body.get("drain_seconds", DEFAULT_MOVE_DRAIN)),
        force=bool(call.body.get("force", False)))
    return Reply(202, opview.view(op), {"Location": f"{PREFIX}/operations/{op.id}"})


async def drain_host(call: Call) -> Reply:
    body = call.body
    options = DrainOptions(to=body.get("to"), rate=body.get("rate_per_minute"),
                           drain=float(body.get("drain_seconds", DEFAULT_MOVE_DRAIN)))
    op = await call.operations().start_host_drain(call.match["name"], options)
    if op is None:
        return Reply(204)
    call.state.runner.start(op.id)
    return Reply(202, opview.view(op), {"Location": f"{PREFIX}/operations/{op.id}"})


async def list_accounts(call: Call) -> Reply:
    return Reply(200, await call.state.store.list_accounts(tenant=call.query.get("tenant"),
                                                           **_paging(call)))


async def add_account(call: Call) -> Reply:
    body = call.body
    await call.service().add_account(
        body["username"], body["tenant"], protocols=body.get("protocols", PROTOCOLS),
        upstream_username=body.get("upstream_username", ""),
        ssh_upstream_username=body.get("ssh_upstream_username", ""),
        ftp_upstream_username=body.get("ftp_upstream_username", ""),
        authorized_keys=body.get("authorized_keys", ""))
    account = await call.state.store.fetch_account(body["username"])
    return Reply(201, account, {"Location": f"{PREFIX}/accounts/{body['username']}"})


async def show_account(call: Call) -> Reply:
    return Reply(200, await call.service().get_account(call.match["username"]))


async def change_account(call: Call) -> Reply:
    return Reply(200, await call.service().update_account(call.match["username"], **call.body))


async def remove_account(call: Call) -> Reply:
    await call.service().remove_account(call.match["username"])
    return Reply(204)


async def list_sites(call: Call) -> Reply:
    return Reply(200, await call.state.store.list_sites(tenant=call.query.get("tenant"),
                                                        **_paging(call)))


async def add_site(call: Call) -> Reply:
    fields = dict(call.body)
    hostname, tenant = fields.pop("hostname"), fields.pop("tenant")
    name = await call.service().add_site(hostname, tenant, **fields)
    return Reply(201, await _site(call.state.store, name), {"Location": f"{PREFIX}/sites/{name}"})


async def show_site(call: Call) -> Reply:
    return Reply(200, await _site(call.state.store, call.match["hostname"]))


async def change_site(call: Call) -> Reply:
    name = await call.service().update_site(call.match["hostname"], **call.body)
    return Reply(200, await _site(call.state.store, name))


async def remove_site(call: Call) -> Reply:
    await call.service().remove_site(call.match["hostname"])
    return Reply(204)


async def purge_site(call: Call) -> Reply:
    path = call.body.get("path", "")
    await call.service().purge_cache(call.match["hostname"], path)
    site = normalize_hostname(call.match["hostname"], allow_wildcard=True)
    return Reply(202, {"site": site, "path": path or "/"})


async def list_certificates(call: Call) -> Reply:
    certs = await call.state.store.list_certificates(after=call.query.get("after", 0),
                                                     limit=call.query.get("limit", 1000))
    now = time.time()
    return Reply(200, [certificate_view(c, now) for c in certs])


async def import_certificate(call: Call) -> Reply:
    service = call.service()
    cert_id = await service.import_certificate(call.body["chain_pem"].encode(),
                                               call.body["key_pem"].encode())
    cert = await call.state.store.fetch_certificate(cert_id)
    assert cert is not None
    return Reply(201, certificate_view(cert))


def change_view(change: ChangeRecord) -> dict[str, Any]:
    return {"id": change.id, "entity": change.entity, "name": change.name,
            "at": iso(change.at), "actor": change.actor, "before": change.before,
            "after": change.after}


async def _certificate(call: Call, cert_id: int) -> dict[str, Any]:
    cert = await call.state.store.fetch_certificate(cert_id)
    if cert is None:
        raise NotFoundError(f"certificate {cert_id} does not exist")
    return certificate_view(cert)


async def replace_certificate(call: Call) -> Reply:
    cert_id = _path_id(call)
    sites = await call.service().replace_certificate(cert_id, call.body["chain_pem"].encode(),
                                                     call.body["key_pem"].encode())
    return Reply(200, {"certificate": await _certificate(call, cert_id), "sites": sites})


async def remove_certificate(call: Call) -> Reply:
    await call.service().remove_certificate(_path_id(call))
    return Reply(204)


async def bulk_load(call: Call) -> Reply:
    lines = call.body["lines"]
    op = await call.operations().record(BULK_LOAD, "", {"lines": len(lines)})
    call.state.runner.start_bulk_load(op.id, call.state.store, call.state.keybox, lines)
    return Reply(202, opview.view(op), {"Location": f"{PREFIX}/operations/{op.id}"})


async def list_changes(call: Call) -> Reply:
    changes = await call.state.store.change_records(call.query.get("limit", 50),
                                                    entity=call.query.get("entity"),
                                                    name=call.query.get("name"))
    return Reply(200, [change_view(c) for c in changes])


async def list_operations(call: Call) -> Reply:
    now = time.time()
    ops = await call.operations().list_operations(limit=call.query.get("limit", 50),
                                                        state=call.query.get("state"))
    return Reply(200, [opview.view(op, now) for op in ops])


def _path_id(call: Call) -> int:
    try:
        op_id = int(call.match["id"])
    except ValueError:
        raise ValidationError(f"id {call.match['id']!r} is not a number") from None
    if not 1 <= op_id <= 2**62:
        raise ValidationError(f"id {op_id} is out of range")
    return op_id


async def show_operation(call: Call) -> Reply:
    return Reply(200, opview.view(await call.operations().get(_path_id(call))))


FOLLOW_INTERVAL = 1.0
"""Seconds between lines of ``/operations/{id}/events``."""
FOLLOW_MAX_SECONDS = 300.0
"""A stream ends after this long even if the operation still runs (the last line says
``running``): proxies and load balancers cut day-long responses anyway; clients reconnect."""


async def follow_operation(call: Call) -> Reply:
    """Streams the operation (one JSON line per :data:`FOLLOW_INTERVAL`) until it is done;
    the reply's body is the already-sent stream."""
    operations = call.operations()
    op_id = _path_id(call)
    op = await operations.get(op_id)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                           "Cache-Control": "no-store"})
    await response.prepare(call.request)
    give_up = time.monotonic() + FOLLOW_MAX_SECONDS
    while True:
        view = opview.view(op)
        await response.write(json.dumps(view).encode() + b"\n")
        if view["phase"] in ("finished", "failed") or time.monotonic() >= give_up:
            break
        await asyncio.sleep(min(FOLLOW_INTERVAL, max(0.0, give_up - time.monotonic())))
        op = await operations.get(op_id)
    await response.write_eof()
    return Reply(200, response)


async def list_sessions(call: Call) -> Reply:
    params = {k: v for k, v in call.query.items() if k in ("host", "user", "protocol")}
    return Reply(200, await call_edge(call.state.edge_admin, "GET", "/sessions",
                                      token=call.state.edge_token, params=params))


async def kill_session(call: Call) -> Reply:
    answer = await call_edge(call.state.edge_admin, "POST",
                             f"/sessions/{quote(call.match['id'], safe='')}/kill",
                             token=call.state.edge_token, body={"message": call.body.get("message", "")})
    return Reply(200, answer)


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/hosts", list_hosts), ("POST", "/hosts", add_host),
    ("GET", "/hosts/{name}", show_host), ("PATCH", "/hosts/{name}", change_host),
    ("DELETE", "/hosts/{name}", remove_host), ("POST", "/hosts/{name}/drain", drain_host),
    ("GET", "/tenants", list_tenants), ("POST", "/tenants", add_tenant),
    ("GET", "/tenants/{name}", show_tenant), ("PATCH", "/tenants/{name}", set_tenant_state),
    ("DELETE", "/tenants/{name}", remove_tenant), ("POST", "/tenants/{name}/move", move_tenant),
    ("GET", "/accounts", list_accounts), ("POST", "/accounts", add_account),
    ("GET", "/accounts/{username}", show_account),
    ("PATCH", "/accounts/{username}", change_account),
    ("DELETE", "/accounts/{username}", remove_account),
    ("GET", "/sites", list_sites), ("POST", "/sites", add_site),
    ("GET", "/sites/{hostname}", show_site), ("PATCH", "/sites/{hostname}", change_site),
    ("DELETE", "/sites/{hostname}", remove_site),
    ("POST", "/sites/{hostname}/purge", purge_site),
    ("GET", "/certificates", list_certificates), ("POST", "/certificates", import_certificate),
    ("PUT", "/certificates/{id}", replace_certificate),
    ("DELETE", "/certificates/{id}", remove_certificate),
    ("GET", "/changes", list_changes), ("POST", "/bulk-load", bulk_load),
    ("GET", "/operations", list_operations), ("GET", "/operations/{id}", show_operation),
    ("GET", "/operations/{id}/events", follow_operation),
    ("GET", "/sessions", list_sessions), ("POST", "/sessions/{id}/kill", kill_session),
)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE].doc_json, content_type="application/json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/openapi.json", openapi_json, allow_head=False)
    for method, path, handler in ROUTES:
        app.router.add_route(method, PREFIX + path, _endpoint(handler))


def build_app(store: SQLStore, keybox: KeyBox | None, *, edge_admin: str = "") -> web.Application:
    """The API and the console on one aiohttp app (the caller opens and closes ``store``);
    ``edge_admin`` is the local ``edge serve`` admin listener's base URL (sessions, metrics)."""
    from edge.api import console  # console imports this module: import at call time

    app = web.Application(client_max_size=validate.MAX_BODY)
    state = app[STATE] = ApiState(store, keybox, edge_admin)
    add_routes(app)
    console.add_routes(app)

    async def resume(app: web.Application) -> None:
        await state.runner.resume_unfinished()

    async def stop(app: web.Application) -> None:
        await state.runner.stop()

    app.on_startup.append(resume)
    app.on_shutdown.append(stop)
    return app


__all__ = ["COOKIE", "STATE", "ApiState", "authenticate", "build_app", "tenant_detail"]
