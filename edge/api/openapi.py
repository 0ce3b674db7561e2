"""The admin API's OpenAPI 3.1 document: the one description of every route, its input and
its answers.

The app validates request bodies and query parameters against the schemas written here
(:mod:`edge.api.validate`), so the document cannot drift from what the server accepts;
``tests/test_api_openapi.py`` checks that every route the app registers is documented and
vice versa, and runs schemathesis against the live server.
"""

from __future__ import annotations

from typing import Any

from edge.directory.model import HOST_STATES, PROTOCOLS, PROXY_PROTOCOL_MODES, TENANT_STATES
from edge.directory.tokens import SCOPES

PREFIX = "/api/v1"
NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,62}$"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
STRING = {"type": "string", "maxLength": 65536}
BOOL = {"type": "boolean"}
RULES = {"type": "object", "description": "see docs/http.md (validated like the CLI's JSON)"}
OPERATION_STATES = ("running", "failed", "done")
PHASES = ("loading", "moving", "draining", "finished", "failed")
STEP_COUNTS = ("pending", "done", "skipped", "total")
FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
BULK_KINDS = ("host", "tenant", "certificate", "site", "account")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False, **extra}


_HOST_SETTINGS = {
    "address": {"type": "string", "minLength": 1, "maxLength": 253,
                "description": "IP address or hostname of the backend"},
    "ssh_port": PORT, "ftp_port": PORT, "http_port": PORT, "https_port": PORT,
    "send_proxy_protocol": {"enum": list(PROXY_PROTOCOL_MODES)},
    "backend_tls": BOOL, "ssh_insecure": BOOL,
}
_SITE_SETTINGS = {
    "certificate_id": {"type": ["integer", "null"], "minimum": 1},
    "https_redirect": BOOL, "hsts": BOOL, "cache_policy": RULES, "filters": RULES,
}

_UPSTREAM = {f"{p}upstream_username": {"type": "string", "maxLength": 128,
                                       "description": "name on the backend ('' = default)"}
             for p in ("", "ssh_", "ftp_")}

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": {"type": "string"}}, ("error",)),
    "Host": _obj({"name": {"type": "string"}, **_HOST_SETTINGS,
                  "address": {"type": "string"}, "state": {"enum": list(HOST_STATES)},
                  "notice": {"type": "string"}, "ssh_known_hosts": {"type": "string"},
                  "maintenance_until": {"type": ["number", "null"],
                                        "description": "Unix time the maintenance window ends"}},
                 ("name", "address", "state")),
    "HostCreate": _obj({"name": NAME, **_HOST_SETTINGS}, ("name", "address")),
    "HostPatch": _obj({**_HOST_SETTINGS, "state": {"enum": list(HOST_STATES)},
                       "notice": {"type": "string", "maxLength": 2000}}, minProperties=1),
    "Tenant": _obj({"name": {"type": "string"}, "host": {"type": "string"},
                    "state": {"enum": list(TENANT_STATES)},
                    "previous_host": {"type": ["string", "null"]},
                    "drain_deadline": {"type": ["number", "null"]}}, ("name", "host", "state")),
    "TenantDetail": _obj({"tenant": _ref("Tenant"),
                          "accounts": {"type": "array", "items": _ref("Account")},
                          "sites": {"type": "array", "items": _ref("Site")},
                          "changes": {"type": "array", "items": _ref("Change")}},
                         ("tenant", "accounts", "sites", "changes")),
    "TenantCreate": _obj({"name": NAME, "host": {"type": "string", "minLength": 1}},
                         ("name", "host")),
    "TenantPatch": _obj({"state": {"enum": list(TENANT_STATES)}}, ("state",)),
    "TenantMove": _obj({"to": {"type": "string", "minLength": 1},
                        "drain_seconds": {"type": "number", "minimum": 0, "maximum": 86400,
                                          "description": "close sessions on the old host "
                                                         "after this long (default 300)"},
                        "force": BOOL}, ("to",)),
    "Account": _obj({"username": {"type": "string"}, "tenant": {"type": "string"},
                     "protocols": {"type": "array", "items": {"enum": list(PROTOCOLS)}},
                     "upstream_username": {"type": "string"},
                     "ssh_upstream_username": {"type": "string"},
                     "ftp_upstream_username": {"type": "string"},
                     "authorized_keys": {"type": "string"}},
                    ("username", "tenant", "protocols")),
    "AccountCreate": _obj({"username": {"type": "string", "minLength": 1, "maxLength": 128},
                           "tenant": {"type": "string", "minLength": 1},
                           "protocols": {"type": "array", "minItems": 1, "uniqueItems": True,
                                         "items": {"enum": list(PROTOCOLS)}},
                           **_UPSTREAM, "authorized_keys": STRING}, ("username", "tenant")),
    "AccountPatch": _obj({"tenant": {"type": "string", "minLength": 1},
                          "protocols": {"type": "array", "minItems": 1, "uniqueItems": True,
                                        "items": {"enum": list(PROTOCOLS)}},
                          **_UPSTREAM, "authorized_keys": STRING}, minProperties=1),
    "Site": _obj({"hostname": {"type": "string"}, "tenant": {"type": "string"},
                  **_SITE_SETTINGS}, ("hostname", "tenant")),
    "SiteCreate": _obj({"hostname": {"type": "string", "minLength": 1, "maxLength": 253},
                        "tenant": {"type": "string", "minLength": 1}, **_SITE_SETTINGS},
                       ("hostname", "tenant")),
    "SitePatch": _obj({"tenant": {"type": "string", "minLength": 1}, **_SITE_SETTINGS},
                      minProperties=1),
    "Purge": _obj({"path": {"type": "string", "maxLength": 2000,
                            "description": "only objects under this path prefix"}}),
    "Purged": _obj({"site": {"type": "string"}, "path": {"type": "string"}}, ("site", "path")),
    "Certificate": _obj({"id": {"type": "integer"}, "fingerprint": {"type": "string"},
                         "names": {"type": "array", "items": {"type": "string"}},
                         "not_before": {"type": "string"}, "not_after": {"type": "string"},
                         "expired": BOOL}, ("id", "fingerprint", "names", "not_after")),
    "CertificateReplaced": _obj({"certificate": _ref("Certificate"),
                                 "sites": {"type": "array", "items": {"type": "string"}}},
                                ("certificate", "sites")),
    "TenantRemoved": _obj({"removed": {"type": "string"},
                           "also_removed": {"type": "array", "items": {"type": "string"}}},
                          ("removed", "also_removed")),
    "BulkRecord": {"type": "object", "required": ["kind"],
                   "properties": {"kind": {"enum": list(BULK_KINDS)}},
                   "description": "one line of JSON Lines as `edge bulk-load` reads it (the "
                                  "schema of each line; fields per kind: edge/directory/bulk.py)"},
    "CertificateCreate": _obj({"chain_pem": {"type": "string", "minLength": 1},
                               "key_pem": {"type": "string", "minLength": 1}},
                              ("chain_pem", "key_pem")),
    "Change": _obj({"id": {"type": "integer"}, "entity": {"type": "string"},
                    "name": {"type": "string"}, "at": {"type": "string"},
                    "actor": {"type": "string", "description": "cli:user@host, api:TOKEN, ..."},
                    "before": {"type": ["object", "null"]}, "after": {"type": ["object", "null"]}},
                   ("id", "entity", "name", "at", "actor", "before", "after")),
    "Operation": _obj({"id": {"type": "integer"},
                       "kind": {"enum": ["host-drain", "tenant-move", "bulk-load"]},
                       "target": {"type": "string", "description": "the host tenants leave"},
                       "state": {"enum": list(OPERATION_STATES)},
                       "phase": {"enum": list(PHASES)}, "error": {"type": "string"},
                       "params": {"type": "object"},
                       "created_at": {"type": "string"}, "updated_at": {"type": "string"},
                       "steps": _obj({k: {"type": "integer"} for k in STEP_COUNTS},
                                     STEP_COUNTS),
                       "moves": {"type": "array", "items": _obj(
                           {"seq": {"type": "integer"}, "tenant": {"type": "string"},
                            "to": {"type": "string"}, "state": {"enum": ["pending", "done",
                                                                          "skipped"]}},
                           ("seq", "tenant", "to", "state"))},
                       "moves_progress": FRACTION, "drain_progress": FRACTION,
                       "drain_until": {"type": ["string", "null"]}},
                      ("id", "kind", "target", "state", "phase", "error", "params", "created_at",
                       "updated_at", "steps", "moves", "moves_progress", "drain_progress", "drain_until")),
    "HostDrain": _obj({"to": {"type": "string", "minLength": 1,
                              "description": "every tenant to this host (default: spread over "
                                             "the other active hosts, least loaded first)"},
                       "rate_per_minute": {"type": "number", "exclusiveMinimum": 0,
                                           "maximum": 100000},
                       "drain_seconds": {"type": "number", "minimum": 0, "maximum": 86400}}),
    "Session": {"type": "object", "description": "one live session (edge.sessions.SessionInfo)",
                "properties": {"id": {"type": "string"}, "protocol": {"type": "string"},
                               "user": {"type": "string"}, "tenant": {"type": "string"},
                               "host": {"type": "string"}, "client": {"type": "string"},
                               "since": {"type": "number"}, "bytes_up": {"type": "integer"},
                               "bytes_down": {"type": "integer"}},
                "required": ["id", "protocol", "host"]},
    "Sessions": _obj({"sessions": {"type": "array", "items": _ref("Session")},
                      "errors": {"type": "array", "items": {"type": "string"}}},
                     ("sessions", "errors")),
    "SessionKill": _obj({"message": {"type": "string", "maxLength": 400,
                                     "pattern": "^[^\\r\\n\\x00]*$",
                                     "description": "shown to the user (one line)"}}),
    "Killed": _obj({"killed": {"type": "string"}}, ("killed",)),
}

_ERRORS = {
    "400": "malformed request (not JSON)",
    "401": "no token, or an unknown one",
    "403": "the token lacks the scope this route needs",
    "404": "a named object does not exist",
    "409": "conflicts with what exists (duplicate name, host in use, request in flight)",
    "422": "refused input (names the field); nothing was written",
    "503": "the directory database (or, for sessions, the local edge serve) is unreachable",
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _responses(ok: str, ok_schema: dict[str, Any] | None, errors: tuple[str, ...],
               ok_description: str = "done") -> dict[str, Any]:
    out: dict[str, Any] = {ok: {"description": ok_description}}
    if ok_schema is not None:
        out[ok]["content"] = _json(ok_schema)
    for code in ("401", "403", *errors, "503"):
        out[code] = {"description": _ERRORS[code], "content": _json(_ref("Error"))}
    return out


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 253}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


PAGING = [_query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                 "at most this many rows (1000)"),
          _query("after", {"type": "string", "maxLength": 253}, "start after this name (paging)")]
IDEMPOTENCY: dict[str, Any] = {"name": "Idempotency-Key", "in": "header", "required": False,
               "schema": {"type": "string", "minLength": 1, "maxLength": 200,
                          "pattern": "^[\\x21-\\x7e]+$"},
               "description": "same key and body within 24 h → the stored answer again "
                              "(header Idempotency-Replayed: true); same key, other body → 422"}


def _op(summary: str, scope: str, responses: dict[str, Any], *, params: list[Any] | None = None,
        body: str | None = None, body_content: dict[str, Any] | None = None,
        write: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "x-scope": scope, "responses": responses,
                          "security": [{"bearer": []}],
                          "operationId": summary.lower().replace(" ", "_").replace("'", "")}
    parameters = list(params or [])
    if write:
        # Any write can meet its Idempotency-Key in flight (409) or reused for another body (422).
        parameters.append(IDEMPOTENCY)
        for code in ("409", "422"):
            responses.setdefault(code, {"description": _ERRORS[code],
                                        "content": _json(_ref("Error"))})
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(_ref(body))}
    if body_content is not None:
        op["requestBody"] = {"required": True, "content": body_content}
    return op


def _list(kind: str, item: str, extra: list[Any] | None = None) -> dict[str, Any]:
    return _op(f"list {kind}", "read", _responses("200", {"type": "array", "items": _ref(item)},
                                                  ("422",)), params=[*(extra or []), *PAGING])


def _paths() -> dict[str, Any]:
    name, host, tenant = _path_param("name"), _path_param("name"), _path_param("name")
    hostname, username = _path_param("hostname"), _path_param("username")
    op_id = {"name": "id", "in": "path", "required": True,
             "schema": {"type": "integer", "minimum": 1, "maximum": 2**62}}
    cert_id = op_id
    return {
        "/api/openapi.json": {"get": {
            "summary": "this document", "operationId": "openapi", "security": [],
            "responses": {"200": {"description": "OpenAPI 3.1",
                                  "content": _json({"type": "object"})}}}},
        f"{PREFIX}/hosts": {
            "get": _op("list hosts", "read", _responses("200", {"type": "array",
                                                                "items": _ref("Host")}, ())),
            "post": _op("add host", "write", _responses("201", _ref("Host"), ("400", "409", "422"),
                                                        "created"), body="HostCreate", write=True)},
        f"{PREFIX}/hosts/{{name}}": {
            "get": _op("show host", "read", _responses("200", _ref("Host"), ("404",)),
                       params=[host]),
            "patch": _op("change host", "write", _responses("200", _ref("Host"),
                                                            ("400", "404", "409", "422")),
                         params=[host], body="HostPatch", write=True),
            "delete": _op("remove host", "write", _responses("204", None, ("404", "409")),
                          params=[host], write=True)},
        f"{PREFIX}/hosts/{{name}}/drain": {
            "post": _op("drain host", "write",
                        {**_responses("202", _ref("Operation"), ("400", "404", "409", "422"),
                                      "planned; runs in the background (poll or follow it)"),
                         "204": {"description": "no tenant is on the host: nothing to do"}},
                        params=[host], body="HostDrain", write=True)},
        f"{PREFIX}/tenants": {
            "get": _list("tenants", "Tenant", [_query("host", {"type": "string", "maxLength": 253},
                                                      "only tenants on this host")]),
            "post": _op("add tenant", "write", _responses("201", _ref("Tenant"),
                                                          ("400", "404", "409", "422"), "created"),
                        body="TenantCreate", write=True)},
        f"{PREFIX}/tenants/{{name}}": {
            "get": _op("show tenant", "read", _responses("200", _ref("TenantDetail"), ("404",)),
                       params=[tenant]),
            "patch": _op("set tenant state", "write", _responses("200", _ref("Tenant"),
                                                                 ("400", "404", "409", "422")),
                         params=[tenant], body="TenantPatch", write=True),
            "delete": _op("remove tenant", "write",
                          _responses("200", _ref("TenantRemoved"), ("404", "409")),
                          params=[tenant, _query("cascade", {"enum": ["true", "false"]},
                                                 "also remove its sites and accounts "
                                                 "(else refused while it has any)")],
                          write=True)},
        f"{PREFIX}/tenants/{{name}}/move": {
            "post": _op("move tenant", "write",
                        _responses("202", _ref("Operation"), ("400", "404", "409", "422"),
                                   "moved; the operation tracks the drain of the old host"),
                        params=[name], body="TenantMove", write=True)},
        f"{PREFIX}/accounts": {
            "get": _list("accounts", "Account", [_query("tenant", {"type": "string",
                                                                   "maxLength": 253},
                                                        "only this tenant's accounts")]),
            "post": _op("add account", "write", _responses("201", _ref("Account"),
                                                           ("400", "404", "409", "422"),
                                                           "created"),
                        body="AccountCreate", write=True)},
        f"{PREFIX}/accounts/{{username}}": {
            "get": _op("show account", "read", _responses("200", _ref("Account"), ("404",)),
                       params=[username]),
            "patch": _op("change account", "write",
                         _responses("200", _ref("Account"), ("400", "404", "409", "422")),
                         params=[username], body="AccountPatch", write=True),
            "delete": _op("remove account", "write", _responses("204", None, ("404", "409")),
                          params=[username], write=True)},
        f"{PREFIX}/sites": {
            "get": _list("sites", "Site", [_query("tenant", {"type": "string", "maxLength": 253},
                                                  "only this tenant's sites")]),
            "post": _op("add site", "write", _responses("201", _ref("Site"),
                                                        ("400", "404", "409", "422"), "created"),
                        body="SiteCreate", write=True)},
        f"{PREFIX}/sites/{{hostname}}": {
            "get": _op("show site", "read", _responses("200", _ref("Site"), ("404", "422")),
                       params=[hostname]),
            "patch": _op("change site", "write", _responses("200", _ref("Site"),
                                                            ("400", "404", "409", "422")),
                         params=[hostname], body="SitePatch", write=True),
            "delete": _op("remove site", "write", _responses("204", None, ("404", "409", "422")),
                          params=[hostname], write=True)},
        f"{PREFIX}/sites/{{hostname}}/purge": {
            "post": _op("purge site cache", "write",
                        _responses("202", _ref("Purged"), ("400", "404", "409", "422"),
                                   "every worker drops the objects within ~1 s"),
                        params=[hostname], body="Purge", write=True)},
        f"{PREFIX}/certificates": {
            "get": _op("list certificates", "read",
                       _responses("200", {"type": "array", "items": _ref("Certificate")},
                                  ("422",)),
                       params=[_query("limit", {"type": "integer", "minimum": 1,
                                                "maximum": 1000}, "at most this many"),
                               _query("after", {"type": "integer", "minimum": 0,
                                                "maximum": 2**62}, "start after this id")]),
            "post": _op("import certificate", "write",
                        _responses("201", _ref("Certificate"), ("400", "409", "422"),
                                   "imported (key encrypted at rest)"),
                        body="CertificateCreate", write=True)},
        f"{PREFIX}/certificates/{{id}}": {
            "put": _op("replace certificate", "write",
                       _responses("200", _ref("CertificateReplaced"),
                                  ("400", "404", "409", "422"),
                                  "rotated in place (same id); every site using it serves it"),
                       params=[cert_id], body="CertificateCreate", write=True),
            "delete": _op("remove certificate", "write", _responses("204", None, ("404", "409")),
                          params=[cert_id], write=True)},
        f"{PREFIX}/bulk-load": {
            "post": _op("bulk load", "write",
                        _responses("202", _ref("Operation"), ("400", "409", "422"),
                                   "accepted; loads in the background, all or nothing (the "
                                   "operation ends done with counts, or failed naming the "
                                   "first bad line)"),
                        body_content={"application/x-ndjson": {"schema": _ref("BulkRecord")}},
                        write=True)},
        f"{PREFIX}/changes": {
            "get": _op("list changes", "read",
                       _responses("200", {"type": "array", "items": _ref("Change")}, ("422",)),
                       params=[_query("limit", {"type": "integer", "minimum": 1,
                                                "maximum": 1000}, "newest first (50)"),
                               _query("entity", {"type": "string", "maxLength": 16},
                                      "only this kind: host, tenant, account, site, ..."),
                               _query("name", {"type": "string", "maxLength": 253},
                                      "only this object")])},
        f"{PREFIX}/operations": {
            "get": _op("list operations", "read",
                       _responses("200", {"type": "array", "items": _ref("Operation")},
                                  ("422",)),
                       params=[_query("limit", {"type": "integer", "minimum": 1,
                                                "maximum": 1000}, "newest first (50)"),
                               _query("state", {"enum": list(OPERATION_STATES)},
                                      "only operations in this state")])},
        f"{PREFIX}/sessions": {
            "get": _op("list sessions", "sessions",
                       _responses("200", _ref("Sessions"), ("422",),
                                  "every live session of this machine's edge serve workers"),
                       params=[_query(n, {"type": "string", "maxLength": 253}, d) for n, d in
                               (("host", "only sessions to this backend host"),
                                ("user", "only this login"),
                                ("protocol", "ssh, ftp or http"))])},
        f"{PREFIX}/sessions/{{id}}/kill": {
            "post": _op("kill session", "sessions",
                        _responses("200", _ref("Killed"), ("400", "404", "422"),
                                   "closed with the message shown to the user"),
                        params=[_path_param("id")], body="SessionKill", write=True)},
        f"{PREFIX}/operations/{{id}}": {
            "get": _op("show operation", "read", _responses("200", _ref("Operation"),
                                                            ("404", "422")), params=[op_id])},
        f"{PREFIX}/operations/{{id}}/events": {
            "get": _op("follow operation", "read", {
                **_responses("200", None, ("404", "422"), "one Operation JSON object per line "
                             "(application/x-ndjson) until it is no longer running"),
                "200": {"description": "one Operation JSON object per line until it is no "
                                       "longer running",
                        "content": {"application/x-ndjson": {"schema": _ref("Operation")}}}},
                params=[op_id])},
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "hosting edge admin API", "version": "1",
                 "description": "Bearer tokens from `edge token add NAME --scope "
                                f"{','.join(SCOPES)}`; each operation's x-scope names the "
                                "scope it needs. Every write accepts an Idempotency-Key."},
        "paths": _paths(),
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
    }


__all__ = ["PREFIX", "SCHEMAS", "document"]
