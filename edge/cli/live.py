"""``edge sessions``, ``edge status``, ``edge host drain``, ``edge operations``.

``sessions`` and ``status`` ask a running ``edge serve`` through its admin listener (the first
``[admin] listen`` address, or ``--admin URL``): they need no database. ``host drain`` and
``operations`` work on the directory (:mod:`edge.operations`).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from edge.cli.output import table, to_jsonable
from edge.directory.model import Host
from edge.directory.service import DEFAULT_MOVE_DRAIN, iso
from edge.errors import EdgeError, NotFoundError, ValidationError
from edge.operations import DrainOptions, Operation, Operations, Step, parse_rate
from edge.sessionpolicy import host_state
from edge.sessions import PROTOCOLS

if TYPE_CHECKING:
    from edge.cli.main import Context

ADMIN_TIMEOUT = 15.0


class AdminUnreachable(EdgeError):
    """``edge serve``'s admin listener did not answer."""

    exit_code = 5


def admin_url(ctx: Context) -> str:
    """``--admin`` or the first ``[admin] listen`` address (a wildcard means this machine)."""
    given = getattr(ctx.args, "admin", None)
    if given:
        return str(given).rstrip("/")
    listen = ctx.config.admin.listen
    if not listen:
        raise EdgeError("[admin] listen is empty: pass --admin http://HOST:PORT")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen[0].host,
                                                                       listen[0].host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{listen[0].port}"


async def _admin(ctx: Context, method: str, path: str, *, params: dict[str, str] | None = None,
                 body: Any = None) -> tuple[int, Any]:
    """One request to the admin listener; returns (status, decoded JSON)."""
    import aiohttp

    from edge.liveapi import admin_token, auth_headers

    url = admin_url(ctx) + path
    headers = auth_headers(admin_token(ctx.config.secrets))
    try:
        timeout = aiohttp.ClientTimeout(total=ADMIN_TIMEOUT)
        async with (aiohttp.ClientSession(timeout=timeout) as session,
                    session.request(method, url, params=params, json=body,
                                    headers=headers) as response):
            code, reply = response.status, await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise AdminUnreachable(f"no answer from the admin listener at {url} "
                               f"({exc or type(exc).__name__}); is `edge serve` running? "
                               "(--admin URL to ask another)") from None
    if code in (401, 403):  # not an empty list: the operator must see why
        raise EdgeError(f"{url}: {reply.get('error', code)}")
    return code, reply


# -- sessions -----------------------------------------------------------------------------------

async def cmd_sessions(ctx: Context) -> Any:
    a = ctx.args
    params = {k: v for k, v in (("host", a.host), ("user", a.user), ("protocol", a.protocol)) if v}
    _, reply = await _admin(ctx, "GET", "/sessions", params=params)
    for error in reply.get("errors", []):
        print(f"edge: warning: {error}", file=sys.stderr)
    rows = reply.get("sessions", [])
    if ctx.json:
        return rows
    now = time.time()
    return table([(r["id"], r["protocol"], r["user"], r["tenant"], r["host"], r["client"],
                   iso(r["since"]), _age(now - r["since"]), r["bytes_up"], r["bytes_down"])
                  for r in rows],
                 ("ID", "PROTO", "USER", "TENANT", "HOST", "CLIENT", "SINCE", "AGE", "BYTES-UP",
                  "BYTES-DOWN"))


async def cmd_sessions_kill(ctx: Context) -> Any:
    code, reply = await _admin(ctx, "POST", f"/sessions/{ctx.args.id}/kill",
                               body={"message": ctx.args.message or ""})
    if code == 404:
        raise NotFoundError(reply.get("error", f"no live session {ctx.args.id!r}"))
    if code != 200:
        raise ValidationError(reply.get("error", f"admin listener answered {code}"))
    return reply if ctx.json else f"session {ctx.args.id} closed"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# -- status -------------------------------------------------------------------------------------

async def cmd_status(ctx: Context) -> Any:
    from edge.status import render

    _, reply = await _admin(ctx, "GET", "/status", params={"window": str(ctx.args.window)})
    return reply if ctx.json else render(reply)


# -- host drain and operations ------------------------------------------------------------------

def parse_until(text: str, now: float | None = None) -> float:
    """``--until``: an ISO 8601 time (UTC unless it says otherwise) or ``+DURATION``."""
    from edge.cli.main import parse_duration

    now = time.time() if now is None else now
    if text.startswith("+"):
        return now + parse_duration(text[1:])
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(f"--until {text!r}: expected e.g. 2026-12-08T06:00Z or +2h") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def state_text(host: Host, now: float | None = None) -> str:
    """A host's state as the proxies see it: a maintenance window shows its end."""
    until = host.maintenance_until
    if host.state != "maintenance" or until is None:
        return host.state
    if host_state(host, now) == "active":
        return f"active (maintenance ended {iso(until)})"
    return f"maintenance until {iso(until)}"


def _operations(ctx: Context) -> Operations:
    assert ctx.store is not None
    return Operations(ctx.store, ctx.service())


async def cmd_host_drain(ctx: Context) -> Any:
    from edge.cli.main import parse_duration

    a = ctx.args
    options = DrainOptions(to=a.to, rate=parse_rate(a.rate) if a.rate else None,
                           drain=parse_duration(a.drain))
    ops = _operations(ctx)
    operation = await ops.start_host_drain(a.name, options)
    if operation is None:
        return {"operation": None} if ctx.json else f"host {a.name} has no tenants: nothing to do"
    if not ctx.json:
        print(f"operation {operation.id}: draining host {a.name} "
              f"({operation.progress['pending']} of {operation.progress['total']} moves pending)",
              flush=True)
    return await _run(ctx, ops, operation.id)


async def cmd_operations_resume(ctx: Context) -> Any:
    return await _run(ctx, _operations(ctx), ctx.args.id)


async def _run(ctx: Context, ops: Operations, operation_id: int) -> Any:
    from edge.cli.main import parse_duration

    def progress(step: Step) -> None:
        if not ctx.json:
            print(f"  {step.tenant} -> {step.to_host}: {step.state}", flush=True)

    try:
        operation = await ops.resume(operation_id, retry_for=parse_duration(ctx.args.retry_for),
                                     on_step=progress)
    except EdgeError as exc:
        raise type(exc)(f"{exc} (operation {operation_id} is saved: run "
                        f"`edge operations resume {operation_id}` to continue)") from None
    if operation.state == "failed":
        raise EdgeError(f"operation {operation.id} stopped: {operation.error} (fix it, then "
                        f"`edge operations resume {operation.id}`)")
    return operation if ctx.json else _describe(operation)


def _describe(op: Operation) -> str:
    p = op.progress
    return (f"operation {op.id} ({op.kind} {op.target}) {op.state}: {p['done']} moved, "
            f"{p['skipped']} skipped, {p['pending']} pending of {p['total']}")


async def cmd_operations_list(ctx: Context) -> Any:
    operations = await _operations(ctx).list_operations(limit=ctx.args.limit, state=ctx.args.state)
    if ctx.json:
        return [_summary(op) for op in operations]
    return table([(op.id, op.kind, op.target, op.state, f"{op.progress['done'] + op.progress['skipped']}"
                   f"/{op.progress['total']}", iso(op.created_at), iso(op.updated_at), op.error)
                  for op in operations],
                 ("ID", "KIND", "TARGET", "STATE", "STEPS", "CREATED", "UPDATED", "ERROR"))


def _summary(op: Operation) -> dict[str, Any]:
    data: dict[str, Any] = to_jsonable(op)
    data.pop("steps")
    return {**data, "progress": op.progress}


async def cmd_operations_show(ctx: Context) -> Any:
    op = await _operations(ctx).get(ctx.args.id)
    if ctx.json:
        return {**to_jsonable(op), "progress": op.progress}
    lines = [_describe(op), f"options: {op.params}", f"created: {iso(op.created_at)}",
             f"updated: {iso(op.updated_at)}"]
    if op.error:
        lines.append(f"error: {op.error}")
    lines.append(table([(s.seq, s.tenant, s.to_host, s.state, iso(s.done_at) if s.done_at else "")
                        for s in op.steps], ("SEQ", "TENANT", "TO", "STATE", "AT")))
    return "\n".join(lines)


# -- parser ---------------------------------------------------------------------------------------

NO_STORE = {cmd_sessions, cmd_sessions_kill, cmd_status}
NEEDS_STORE = {cmd_host_drain, cmd_operations_list, cmd_operations_show, cmd_operations_resume}


def _admin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", metavar="URL",
                        help="admin listener of the edge to ask (default: first [admin] listen)")


def _retry_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retry-for", default="60s", metavar="DURATION",
                        help="keep retrying while the directory is unreachable this long (60s)")


def add_host_drain(hs: Any, leaf: Any) -> None:
    """``edge host drain`` under the ``host`` subcommands (``leaf`` is main's ``_leaf``)."""
    p = leaf(hs, "drain", cmd_host_drain,
             "move every tenant off a host as one resumable operation (idempotent)")
    p.add_argument("name")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="HOST", help="move every tenant to this host")
    where.add_argument("--spread", action="store_true",
                       help="spread the tenants over the other active hosts (least loaded first)")
    p.add_argument("--rate", metavar="N/min", help="at most N moves per minute (default: no limit)")
    p.add_argument("--drain", default=f"{DEFAULT_MOVE_DRAIN:g}s", metavar="DURATION",
                   help="close sessions left on the old host this long after each move "
                        f"(as `tenant move --drain`, {DEFAULT_MOVE_DRAIN:g}s)")
    _retry_flag(p)


def add_commands(sub: Any, leaf: Any) -> None:
    """``sessions``, ``status`` and ``operations`` (``leaf`` is main's ``_leaf``)."""
    sessions = leaf(sub, "sessions", cmd_sessions,
                    "open SSH/FTP sessions and WebSocket connections on every worker")
    sessions.add_argument("--host", help="only sessions routed to this backend host")
    sessions.add_argument("--user", help="only this login (HTTP: site hostname)")
    sessions.add_argument("--protocol", choices=PROTOCOLS)
    _admin_flag(sessions)
    ss = sessions.add_subparsers(dest="action", metavar="ACTION")
    p = leaf(ss, "kill", cmd_sessions_kill,
             "close one session; the user is told MESSAGE (SSH disconnect, FTP 421, "
             "WebSocket close frame)")
    p.add_argument("id")
    p.add_argument("--message", help="what the user is told (default: closed by an administrator)")
    _admin_flag(p)

    p = leaf(sub, "status", cmd_status,
             "workers, rates, cache, directory and change feed of a running edge")
    p.add_argument("--window", type=float, default=1.0, help="seconds to measure rates over (1)")
    _admin_flag(p)

    operations = sub.add_parser("operations", help="long operations (host drains)")
    ops = operations.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(ops, "list", cmd_operations_list, "the newest operations")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--state", choices=("running", "failed", "done"))
    p = leaf(ops, "show", cmd_operations_show, "one operation with every step")
    p.add_argument("id", type=int)
    p = leaf(ops, "resume", cmd_operations_resume,
             "continue an interrupted or failed operation where it stopped")
    p.add_argument("id", type=int)
    _retry_flag(p)


__all__ = ["NEEDS_STORE", "NO_STORE", "add_commands", "add_host_drain", "admin_url",
           "parse_until", "state_text"]
