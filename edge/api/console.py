"""The web console: server-rendered HTML on the admin API's listener (no scripts from
anywhere else; one small inline script follows a running operation).

* ``/console/login``: paste a token (``edge token add NAME --scope read,write``); it is kept
  in an HttpOnly, ``SameSite=Strict`` cookie (``Secure`` under TLS).
* ``/console/``: the fleet — hosts with state and tenant count, the local edge's live
  sessions and error ratios (scraped from ``edge serve``'s ``/metrics``), recent operations
  and changes.
* ``/console/tenants/{name}``: sites and accounts with where each routes, recent changes,
  and a move form; ``/console/operations/{id}`` follows the move's drain live.

CSRF: every POST must come from this origin (``Origin``, else ``Sec-Fetch-Site``) and carry a
form token derived from the login token; the cookie is ``SameSite=Strict`` and the JSON API
refuses cookie-authenticated writes altogether.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import time
from typing import Any

from aiohttp import web

from edge.api import operations as opview
from edge.api.app import COOKIE, STATE, AuthError, authenticate, error_status, tenant_detail
from edge.api.fleetmetrics import LocalMetrics, scrape_local_edge
from edge.api.live import call_edge
from edge.api.openapi import PREFIX
from edge.directory.model import Host
from edge.directory.service import DEFAULT_MOVE_DRAIN, iso
from edge.directory.tokens import Token
from edge.errors import EdgeError, ValidationError
from edge.operations import DrainOptions, Operation

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f4f6f9}
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}
header a{color:#cfe0ff;text-decoration:none}header form{margin-left:auto}
main{padding:1em 1.5em;max-width:1100px}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{text-align:left;padding:.35em .7em;border-bottom:1px solid #e3e7ee}th{background:#eef1f6}
.state-active,.state-done,.state-finished{color:#137333}
.state-running,.state-moving,.state-draining,.state-pending{color:#b06000}.state-failed{color:#c5221f}.state-maintenance{color:#b06000}.state-down,.error{color:#c5221f}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{background:#fff;padding:.7em 1em;border-radius:6px;
min-width:10em;box-shadow:0 1px 2px #0002}.card b{display:block;font-size:1.5em}
progress{width:100%;height:1.4em}form.inline{display:flex;gap:.6em;align-items:end;flex-wrap:wrap}
label{display:flex;flex-direction:column;font-size:.9em}input,select,button{font:inherit;padding:.3em}
.muted{color:#6b7280}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def csrf_token(secret: str) -> str:
    """The form token for a login: knowable only to whoever holds the login token."""
    return hmac.new(secret.encode(), b"edge-console-csrf", hashlib.sha256).hexdigest()


def page(title: str, body: str, token: Token | None = None, status: int = 200) -> web.Response:
    nav = ""
    if token is not None:
        nav = (f'<a href="/console/">Fleet</a><span class="muted">signed in as {_e(token.name)} '
               f'({_e(",".join(sorted(token.scopes)))})</span><form method="post" '
               'action="/console/logout"><button>Sign out</button></form>')
    text = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)} · '
            f'edge console</title><meta name="viewport" content="width=device-width">'
            f"<style>{_STYLE}</style></head><body><header><strong>hosting edge</strong>{nav}"
            f"</header><main><h1>{_e(title)}</h1>{body}</main></body></html>")
    return web.Response(status=status, text=text, content_type="text/html", headers={
        "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                   "script-src 'unsafe-inline'; frame-ancestors 'none'",
        "X-Frame-Options": "DENY", "Cache-Control": "no-store", "Referrer-Policy": "same-origin"})


def same_origin(request: web.Request) -> bool:
    """True when the browser says this POST comes from a page of this very origin."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == f"{request.scheme}://{request.host}"
    return request.headers.get("Sec-Fetch-Site") == "same-origin"


async def _login_token(request: web.Request, scope: str = "read") -> Token:
    """The signed-in token, or a redirect to the login page (403 page for a missing scope)."""
    if COOKIE not in request.cookies:
        raise web.HTTPSeeOther("/console/login")
    try:
        # A GET through authenticate() accepts the cookie; the scope is checked here.
        token = await authenticate(request, request.app[STATE], "read")
    except AuthError:
        raise web.HTTPSeeOther("/console/login") from None
    if not token.allows(scope):
        raise web.HTTPForbidden(text=f"token {token.name!r} lacks the {scope!r} scope")
    return token


async def _checked_post(request: web.Request, scope: str) -> tuple[Token, dict[str, str]]:
    """A console form POST: same origin, signed in with ``scope``, matching form token."""
    if not same_origin(request):
        raise web.HTTPForbidden(text="cross-origin form posts are refused")
    form = {k: str(v) for k, v in (await request.post()).items()}
    secret = request.cookies.get(COOKIE, "")
    token = await request.app[STATE].tokens.verify(secret) if secret else None
    if token is None:
        raise web.HTTPSeeOther("/console/login")
    if not hmac.compare_digest(form.get("csrf", ""), csrf_token(secret)):
        raise web.HTTPForbidden(text="the form token does not match this login; reload the page")
    if not token.allows(scope):
        raise web.HTTPForbidden(text=f"token {token.name!r} lacks the {scope!r} scope")
    return token, form


# -- login ------------------------------------------------------------------------------------

async def login_form(request: web.Request, problem: str = "") -> web.Response:
    error = f'<p class="error">{_e(problem)}</p>' if problem else ""
    return page("Sign in", f"""{error}<form method="post" action="/console/login" class="inline">
<label>API token<input type="password" name="token" size="60" autocomplete="off"
 placeholder="edge_..." required></label><button>Sign in</button></form>
<p class="muted">Create one with <code>edge token add NAME --scope read,write</code>.</p>""",
                status=401 if problem else 200)


async def login(request: web.Request) -> web.Response:
    if not same_origin(request):
        raise web.HTTPForbidden(text="cross-origin form posts are refused")
    secret = str((await request.post()).get("token", "")).strip()
    token = await request.app[STATE].tokens.verify(secret) if secret else None
    if token is None or not token.allows("read"):
        return await login_form(request, "unknown token, or one without the read scope")
    response = web.HTTPSeeOther("/console/")
    response.set_cookie(COOKIE, secret, httponly=True, samesite="Strict", path="/",
                        secure=request.secure)
    raise response


async def logout(request: web.Request) -> web.Response:
    if not same_origin(request):
        raise web.HTTPForbidden(text="cross-origin form posts are refused")
    response = web.HTTPSeeOther("/console/login")
    response.del_cookie(COOKIE, path="/")
    raise response


# -- pages ------------------------------------------------------------------------------------

HOST_COLUMNS = ("Host", "Address", "State", "Tenants", "Live sessions", "Notice")
CHANGE_COLUMNS = ("At", "Entity", "Name", "By", "Before → after")
OP_COLUMNS = ("Id", "Kind", "Tenant", "From host", "Phase", "Moves")
SITE_COLUMNS = ("Hostname", "HTTP to", "HTTPS to", "Certificate", "Redirect")
ACCOUNT_COLUMNS = ("Login", "Protocols", "Upstream user", "SSH to")


def _table(headers: tuple[str, ...], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _cells(*values: str) -> str:
    return "<tr>" + "".join(f"<td>{v}</td>" for v in values) + "</tr>"


def _state(state: str) -> str:
    return f'<span class="state-{_e(state)}">{_e(state)}</span>'


def _metric_cards(metrics: LocalMetrics | None) -> str:
    if metrics is None:
        return ('<p class="muted">The local <code>edge serve</code> admin listener did not '
                "answer; live sessions and error ratios are unavailable.</p>")
    cards = [(f"{n}", f"{proxy.upper()} sessions open") for proxy, n in
             sorted(metrics.active_sessions.items())]
    cards += [(metrics.ratio_text(metrics.http_5xx, metrics.http_requests), "HTTP 5xx"),
              (metrics.ratio_text(metrics.ssh_edge_failures, metrics.ssh_logins),
               "SSH logins failed by the edge"),
              (metrics.ratio_text(metrics.ftp_unavailable, metrics.ftp_logins),
               "FTP logins refused (unavailable)")]
    body = "".join(f'<div class="card"><b>{_e(v)}</b>{_e(label)}</div>' for v, label in cards)
    return (f'<div class="cards">{body}</div><p class="muted">Since this edge started '
            f"({metrics.workers} workers). Fleet-wide rates: the Prometheus dashboards.</p>")


async def _sessions_per_host(edge_admin: str, token: str | None) -> dict[str, int] | None:
    """Live sessions per backend host on this machine's edge (``None``: it did not answer)."""
    try:
        listing = await call_edge(edge_admin, "GET", "/sessions", token=token)
    except EdgeError:
        return None
    counts: dict[str, int] = {}
    for session in listing.get("sessions", ()):
        counts[str(session.get("host"))] = counts.get(str(session.get("host")), 0) + 1
    return counts


def _op_rows(ops: list[Operation], now: float) -> list[str]:
    return [_cells(f'<a href="/console/operations/{op.id}">#{op.id}</a>', _e(op.kind),
                   _e(op.params.get("tenant") or op.target), _e(op.target),
                   _state(opview.phase(op, now)),
                   f"{op.progress['done'] + op.progress['skipped']}/{op.progress['total']}")
            for op in ops]


def _drain_form(hosts: list[Host], secret: str) -> str:
    names = "".join(f'<option value="{_e(h.name)}">{_e(h.name)}</option>' for h in hosts)
    targets = "".join(f'<option value="{_e(h.name)}">{_e(h.name)}</option>'
                      for h in hosts if h.state == "active")
    return f"""<h2>Drain a host</h2>
<form method="post" action="/console/drain" class="inline">
<input type="hidden" name="csrf" value="{csrf_token(secret)}">
<label>Host<select name="host">{names}</select></label>
<label>To<select name="to"><option value="">spread over active hosts</option>{targets}</select>
</label><label>Moves per minute<input name="rate" type="number" min="0" step="any"
 placeholder="no limit"></label>
<label>Drain (seconds)<input name="drain" type="number" min="0" max="86400"
 value="{DEFAULT_MOVE_DRAIN:g}"></label><button id="drain">Drain</button></form>"""


async def overview(request: web.Request) -> web.Response:
    token = await _login_token(request)
    state = request.app[STATE]
    hosts = await state.store.list_hosts()
    counts = await state.store.tenants_per_host()
    edge = state.edge_admin
    metrics = await scrape_local_edge(edge + "/metrics" if edge else "")
    live = await _sessions_per_host(edge, state.edge_token)
    host_rows = [_cells(f'<a href="/console/?host={_e(h.name)}#tenants">{_e(h.name)}</a>',
                        _e(h.address), _state(h.state), _e(counts.get(h.name, 0)),
                        _e("-" if live is None else live.get(h.name, 0)),
                        _e(h.notice)) for h in hosts]
    selected = request.query.get("host")
    tenants = await state.store.list_tenants(host=selected or None, limit=200)
    tenant_rows = [_cells(f'<a href="/console/tenants/{_e(t.name)}">{_e(t.name)}</a>',
                          _e(t.host), _state(t.state),
                          _e(t.previous_host or "")) for t in tenants]
    ops = await state.operations(token).list_operations(limit=10)
    drain = _drain_form(hosts, request.cookies[COOKIE]) if token.allows("write") and hosts else ""
    body = (f"<h2>Live (this edge)</h2>{_metric_cards(metrics)}"
            f"<h2>Hosts</h2>{_table(HOST_COLUMNS, host_rows, 'No hosts yet.')}"
            f'<h2 id="tenants">Tenants{" on " + _e(selected) if selected else ""}</h2>'
            f"{_table(('Tenant', 'Host', 'State', 'Moved from'), tenant_rows, 'No tenants.')}"
            f"<h2>Recent operations</h2>"
            f"{_table(OP_COLUMNS, _op_rows(ops, time.time()), 'None yet.')}{drain}")
    return page("Fleet", body, token)


def _diff_text(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """``host: web1 → web2; state: active → suspended`` (created / removed when one side is
    missing)."""
    if before is None:
        return "created" + (f" ({_pairs(after)})" if after else "")
    if after is None:
        return "removed"
    keys = list(dict.fromkeys([*before, *after]))
    return "; ".join(f"{k}: {before.get(k, '')} → {after.get(k, '')}" for k in keys)


def _pairs(fields: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in fields.items())


def _route_text(host: Host | None, port: int) -> str:
    return "?" if host is None else f"{host.name} {host.address}:{port}"


async def tenant_page(request: web.Request) -> web.Response:
    token = await _login_token(request)
    state = request.app[STATE]
    secret = request.cookies[COOKIE]
    try:
        detail = await tenant_detail(state, request.match_info["name"])
    except EdgeError as exc:
        return page("Tenant", f'<p class="error">{_e(exc)}</p>', token, error_status(exc))
    tenant = detail["tenant"]
    hosts = await state.store.list_hosts()
    by_name = {h.name: h for h in hosts}
    home = by_name.get(tenant.host)
    site_rows = [_cells(_e(s.hostname), _e(_route_text(home, home.http_port if home else 0)),
                        _e(_route_text(home, home.https_port if home else 0)),
                        _e(s.certificate_id or "-"), "yes" if s.https_redirect else "no")
                 for s in detail["sites"]]
    account_rows = [_cells(_e(a.username), _e(",".join(sorted(a.protocols))),
                           _e(a.backend_username),
                           _e(_route_text(home, home.ssh_port if home else 0)))
                    for a in detail["accounts"]]
    change_rows = [_cells(_e(c["at"]), _e(c["entity"]), _e(c["name"]), _e(c["actor"]),
                          _e(_diff_text(c["before"], c["after"]))) for c in detail["changes"]]
    drain = ""
    if tenant.previous_host:
        drain = (f"<p>Moved from <b>{_e(tenant.previous_host)}</b>; sessions there are closed "
                 f"at {_e(iso(tenant.drain_deadline or 0))}.</p>")
    options = "".join(f'<option value="{_e(h.name)}">{_e(h.name)} ({_e(h.state)})</option>'
                      for h in hosts if h.name != tenant.host)
    move = ""
    if token.allows("write") and options:
        move = f"""<h2>Move to another host</h2>
<form method="post" action="/console/tenants/{_e(tenant.name)}/move" class="inline">
<input type="hidden" name="csrf" value="{csrf_token(secret)}">
<label>Target host<select name="to">{options}</select></label>
<label>Drain (seconds)<input name="drain" type="number" min="0" max="86400"
 value="{DEFAULT_MOVE_DRAIN:g}"></label>
<label><span>Force</span><input type="checkbox" name="force" value="1"></label>
<button id="move">Move</button></form>"""
    body = (f"<p>Host <b>{_e(tenant.host)}</b> ({_state(home.state if home else '?')}), tenant "
            f"{_state(tenant.state)}.</p>{drain}"
            f"<h2>Sites</h2>{_table(SITE_COLUMNS, site_rows, 'No sites.')}"
            f"<h2>Accounts</h2>{_table(ACCOUNT_COLUMNS, account_rows, 'No accounts.')}"
            f"<h2>Recent changes</h2>{_table(CHANGE_COLUMNS, change_rows, 'None.')}"
            f"{move}")
    return page(f"Tenant {tenant.name}", body, token)


async def move(request: web.Request) -> web.Response:
    token, form = await _checked_post(request, "write")
    state = request.app[STATE]
    name = request.match_info["name"]
    try:
        op = await state.operations(token).move_tenant(name, form.get("to", ""),
                                                  drain=_seconds(form.get("drain")),
                                                  force=form.get("force") == "1")
    except EdgeError as exc:
        return page(f"Move {name}", f'<p class="error">{_e(exc)}</p><p><a href="/console/'
                    f'tenants/{_e(name)}">Back</a></p>', token, error_status(exc))
    raise web.HTTPSeeOther(f"/console/operations/{op.id}")


async def drain(request: web.Request) -> web.Response:
    token, form = await _checked_post(request, "write")
    state = request.app[STATE]
    host = form.get("host", "")
    try:
        rate = float(form["rate"]) if form.get("rate") else None
        if rate is not None and not rate > 0:
            raise ValidationError("moves per minute must be more than 0")
        op = await state.operations(token).start_host_drain(host, DrainOptions(
            to=form.get("to") or None, rate=rate, drain=_seconds(form.get("drain"))))
    except (EdgeError, ValueError) as exc:
        status = error_status(exc) if isinstance(exc, EdgeError) else 422
        return page(f"Drain {host}", f'<p class="error">{_e(exc)}</p><p><a href="/console/">'
                    "Back</a></p>", token, status)
    if op is None:
        return page(f"Drain {host}", f"<p>No tenant is on {_e(host)}: nothing to do.</p>",
                    token)
    state.runner.start(op.id)
    raise web.HTTPSeeOther(f"/console/operations/{op.id}")


def _seconds(text: str | None) -> float:
    try:
        value = float(text) if text else DEFAULT_MOVE_DRAIN
    except ValueError:
        raise ValidationError(f"drain {text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400:
        raise ValidationError("drain must be 0-86400 seconds")
    return value


_FOLLOW_JS = """
(async () => {
  const set = (id, v) => { document.getElementById(id).textContent = v; };
  const res = await fetch(%(url)s, {credentials: 'same-origin'});
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let nl;
    while ((nl = buffer.indexOf('\\n')) >= 0) {
      const op = JSON.parse(buffer.slice(0, nl)); buffer = buffer.slice(nl + 1);
      document.getElementById('moves').value = op.moves_progress;
      document.getElementById('drained').value = op.drain_progress;
      set('phase', op.phase); set('steps', op.steps.done + op.steps.skipped + '/' + op.steps.total);
      set('error', op.error);
      document.getElementById('phase').className = 'state-' + op.phase;
      for (const m of op.moves) {
        const cell = document.getElementById('step-' + m.seq);
        if (cell) { cell.textContent = m.state; cell.className = 'state-' + m.state; }
      }
    }
  }
})();
"""


async def operation_page(request: web.Request) -> web.Response:
    token = await _login_token(request)
    state = request.app[STATE]
    try:
        op = await state.operations(token).get(int(request.match_info["id"]))
    except (EdgeError, ValueError) as exc:
        status = error_status(exc) if isinstance(exc, EdgeError) else 404
        return page("Operation", f'<p class="error">{_e(exc)}</p>', token, status)
    view = opview.view(op)
    params = op.params
    what = (f'tenant <a href="/console/tenants/{_e(params.get("tenant"))}">'
            f'{_e(params.get("tenant"))}</a> from <b>{_e(op.target)}</b> to '
            f'<b>{_e(params.get("to"))}</b>' if op.kind == "tenant-move" else
            f'every tenant off <b>{_e(op.target)}</b> to <b>'
            f'{_e(params.get("to") or "the other active hosts")}</b>')
    rows = [_cells(_e(s.seq), f'<a href="/console/tenants/{_e(s.tenant)}">{_e(s.tenant)}</a>',
                   _e(s.to_host), f'<span id="step-{s.seq}" class="state-{_e(s.state)}">'
                   f"{_e(s.state)}</span>") for s in op.steps]
    url = f"{PREFIX}/operations/{op.id}/events"
    body = (f"<p>{_e(op.kind)}: {what}. Each move sends new sessions to the new host within "
            f"about a second; sessions on the old host are closed "
            f"{float(params.get('drain', DEFAULT_MOVE_DRAIN)):g} s after their move.</p>"
            f'<p>Phase: <b id="phase" class="state-{_e(view["phase"])}">{_e(view["phase"])}</b>'
            f' · moves <span id="steps">{view["steps"]["done"] + view["steps"]["skipped"]}/'
            f'{view["steps"]["total"]}</span> <span id="error" class="error">{_e(op.error)}'
            f"</span></p><label>Moves<progress id=\"moves\" max=\"1\" "
            f'value="{view["moves_progress"]}"></progress></label>'
            f'<label>Old sessions drained<progress id="drained" max="1" '
            f'value="{view["drain_progress"]}"></progress></label>'
            f"<h2>Steps</h2>{_table(('#', 'Tenant', 'To', 'State'), rows, 'No steps.')}"
            f"<script>{_FOLLOW_JS % {'url': repr(url)}}</script>")
    return page(f"Operation #{op.id}", body, token)


async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/console/")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root, allow_head=False)
    app.router.add_get("/console/login", login_form, allow_head=False)
    app.router.add_post("/console/login", login)
    app.router.add_post("/console/logout", logout)
    app.router.add_get("/console/", overview, allow_head=False)
    app.router.add_get("/console/tenants/{name}", tenant_page, allow_head=False)
    app.router.add_post("/console/tenants/{name}/move", move)
    app.router.add_post("/console/drain", drain)
    app.router.add_get("/console/operations/{id}", operation_page, allow_head=False)


__all__ = ["add_routes", "csrf_token", "same_origin"]
