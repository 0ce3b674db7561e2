"""``edge``: set up the directory, manage hosts/tenants/accounts/sites/certificates, serve.

Every command has ``--help``, prints one line ``edge: error: ...`` and exits non-zero on bad
input (nothing half-written: each write is one transaction in
:class:`~edge.directory.service.DirectoryService`), and takes ``--json`` for scripts.

Exit codes come only from the :class:`~edge.errors.EdgeError` a command raises (never from
what it returns), so they are the same with and without ``--json``; ``--json`` changes only
how a result is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.cli import acme as acme_cli
from edge.cli import admin_commands, live
from edge.cli.output import emit_json, table, to_jsonable
from edge.config import EdgeConfig, load_config
from edge.directory.model import HOST_STATES, TENANT_STATES, ChangeRecord
from edge.directory.secrets import KeyBox, ensure_secret_key, generate_key
from edge.directory.service import DEFAULT_MOVE_DRAIN, DirectoryService, iso
from edge.directory.store import SQLStore
from edge.directory.stores import store_for_url
from edge.errors import (
    DirectoryUnavailable,
    EdgeError,
    NotFoundError,
    SecretsError,
    ValidationError,
)


@dataclass
class Context:
    """What a command gets: parsed args, configuration and (lazily) the store."""

    args: argparse.Namespace
    config: EdgeConfig
    store: SQLStore | None = None

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def keybox(self, required: bool) -> KeyBox | None:
        try:
            return KeyBox.from_config(self.config.secrets)
        except SecretsError:
            if required:
                raise
            return None

    def service(self, *, keys: bool = False) -> DirectoryService:
        assert self.store is not None
        return DirectoryService(self.store, self.keybox(required=keys), actor=cli_actor())


def cli_actor() -> str:
    """Who a CLI change is recorded as: ``cli:user@host`` (the sudo caller if there is one:
    ``sudo edge ...`` by alice is alice's change, not root's)."""
    user = os.environ.get("SUDO_USER") or getpass.getuser()
    return f"cli:{user}@{socket.gethostname()}"


Handler = Callable[[Context], Awaitable[Any]]
_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                     help="machine-readable output")
_COMMON.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                     help="TOML configuration (default: $EDGE_CONFIG, else built-in defaults)")
_COMMON.add_argument("--database", metavar="URL", default=argparse.SUPPRESS,
                     help="sqlite:///PATH or mysql://user:pass@host:port/db "
                          "(default: $EDGE_DATABASE_URL, else [database] url)")


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError(f"{what} {path}: {exc.strerror}") from None


def _json_arg(text: str | None) -> str | None:
    """``--filters`` values: inline JSON, or ``@file.json``."""
    if text is not None and text.startswith("@"):
        return _read_file(text[1:], "rules file").decode()
    return text


# -- commands -------------------------------------------------------------------------------

async def cmd_init(ctx: Context) -> Any:
    assert ctx.store is not None
    applied = await ctx.store.migrate()
    version = await ctx.store.schema_version()
    secret = ensure_secret_key(ctx.config.secrets)
    ssh_keys = _init_ssh_keys(ctx)
    if ctx.json:
        return {"applied": applied, "schema_version": version, "database": ctx.store.url,
                "secret_key": secret, "ssh_keys": ssh_keys}
    done = f"applied migrations {applied}" if applied else "already up to date"
    lines = [f"directory {_safe_url(ctx.store.url)}: {done} (schema version {version})",
             secret_key_line(secret)]
    lines += [f"ssh {k['purpose']} {k['path']}: {k['fingerprint']} "
              f"({'created' if k['created'] else 'kept'})" for k in ssh_keys]
    return "\n".join(lines)


async def cmd_migrate(ctx: Context) -> Any:
    """Only the schema: what a deploy runs once (edge-migrate.service), never at every start."""
    assert ctx.store is not None
    applied = await ctx.store.migrate()
    version = await ctx.store.schema_version()
    if ctx.json:
        return {"applied": applied, "schema_version": version, "database": ctx.store.url}
    done = f"applied migrations {applied}" if applied else "already up to date"
    return f"directory {_safe_url(ctx.store.url)}: {done} (schema version {version})"


def secret_key_line(secret: dict[str, Any]) -> str:
    if secret["source"] == "env":
        return f"secret key: from ${secret['env']} (no key file written; the variable wins)"
    if secret["source"] == "inline":
        return "secret key: from [secrets] key in the configuration (prefer key_file)"
    if secret["created"]:
        return (f"secret key: created {secret['path']} (0600). Every edge command reads it "
                "from there; back it up: without it stored TLS keys cannot be decrypted")
    return f"secret key: {secret['path']} (kept)"


def _init_ssh_keys(ctx: Context) -> list[dict[str, Any]]:
    """The SSH proxy's host keys and upstream key, when [ssh] listens or --ssh-keys is given:
    missing ones are created, existing ones are never replaced (clients' known_hosts stay valid)."""
    if not ctx.config.ssh.listen and not getattr(ctx.args, "ssh_keys", False):
        return []
    import importlib  # edge never imports a proxy package at module top

    hostkeys = importlib.import_module("sshproxy.hostkeys")
    return [{"purpose": k.purpose, "path": str(k.path), "fingerprint": k.fingerprint,
             "created": k.created} for k in hostkeys.ensure_keys(ctx.config.ssh)]


async def cmd_host_pin_ssh_key(ctx: Context) -> Any:
    """Fetch the host's SSH host keys, show their fingerprints, pin them after confirmation."""
    import importlib

    hostkeys = importlib.import_module("sshproxy.hostkeys")
    service = ctx.service()
    host = await service.get_host(ctx.args.name)
    try:
        keys = await hostkeys.fetch_host_keys(host.address, host.ssh_port)
    except Exception as exc:  # OSError, TimeoutError, asyncssh.Error (not imported here)
        raise EdgeError(f"cannot fetch SSH host keys of {host.name} from "
                        f"{host.address}:{host.ssh_port}: {exc}") from None
    shown = [f"{key.get_algorithm()} {key.get_fingerprint()}" for key in keys]
    if not ctx.args.yes:
        print(f"host {host.name} ({host.address}:{host.ssh_port}) presents:", *shown, sep="\n  ",
              file=sys.stderr)
        if not sys.stdin.isatty():
            raise ValidationError("compare the fingerprints above with the backend's "
                                  "(ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) and re-run with --yes")
        answer = await asyncio.to_thread(input, "pin these keys? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise ValidationError("nothing pinned")
    await service.update_host(host.name, ssh_known_hosts=hostkeys.pinned_lines(keys))
    if ctx.json:
        return {"host": host.name, "pinned": shown}
    return "\n".join([f"host {host.name}: pinned {len(keys)} SSH host key(s)", *shown])


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url


async def cmd_host_add(ctx: Context) -> Any:
    a = ctx.args
    host = await ctx.service().add_host(
        a.name, a.address, ssh_port=a.ssh_port, ftp_port=a.ftp_port, http_port=a.http_port,
        https_port=a.https_port, send_proxy_protocol=a.send_proxy_protocol,
        backend_tls=bool(a.backend_tls), ssh_insecure=bool(a.ssh_insecure))
    return host if ctx.json else f"host {host.name} added ({host.address})"


async def cmd_host_list(ctx: Context) -> Any:
    assert ctx.store is not None
    hosts = await ctx.store.list_hosts()
    if ctx.json:
        return hosts
    return table([(h.name, h.address, h.ssh_port, h.ftp_port, h.http_port, h.https_port,
                   live.state_text(h), h.send_proxy_protocol) for h in hosts],
                 ("NAME", "ADDRESS", "SSH", "FTP", "HTTP", "HTTPS", "STATE", "PROXY-PROTO"))


async def cmd_host_show(ctx: Context) -> Any:
    host = await ctx.service().get_host(ctx.args.name)
    if ctx.json:
        return host
    return "\n".join(f"{k}: {v}" for k, v in _fields(host).items())


async def cmd_host_set_state(ctx: Context) -> Any:
    until = live.parse_until(ctx.args.until) if ctx.args.until else None
    host = await ctx.service().set_host_state(ctx.args.name, ctx.args.state, ctx.args.notice,
                                              until=until)
    if ctx.json:
        return host
    return f"host {host.name} is now {host.state}" + (f" until {iso(until)}" if until else "")


async def cmd_host_set(ctx: Context) -> Any:
    a = ctx.args
    fields: dict[str, Any] = {key: getattr(a, key) for key in (
        "address", "ssh_port", "ftp_port", "http_port", "https_port", "send_proxy_protocol",
        "notice", "backend_tls", "ssh_insecure") if getattr(a, key) is not None}
    if not fields:
        raise ValidationError("nothing to change: give at least one option (see --help)")
    host = await ctx.service().update_host(a.name, **fields)
    return host if ctx.json else f"host {host.name} updated ({', '.join(sorted(fields))})"


async def cmd_host_remove(ctx: Context) -> Any:
    await ctx.service().remove_host(ctx.args.name)
    return {"removed": ctx.args.name} if ctx.json else f"host {ctx.args.name} removed"


async def cmd_tenant_remove(ctx: Context) -> Any:
    removed = await ctx.service().remove_tenant(ctx.args.name, cascade=ctx.args.cascade)
    if ctx.json:
        return {"removed": ctx.args.name, "also_removed": removed}
    also = f" with {', '.join(removed)}" if removed else ""
    return f"tenant {ctx.args.name} removed{also}"


async def cmd_account_set(ctx: Context) -> Any:
    a = ctx.args
    keys = None
    if a.authorized_keys is not None:
        keys = "" if a.authorized_keys == "none" else \
            _read_file(a.authorized_keys, "authorized keys file").decode()
    protocols = None if a.protocols is None else \
        [p.strip() for p in a.protocols.split(",") if p.strip()]
    account = await ctx.service().update_account(
        a.username, protocols=protocols, authorized_keys=keys, tenant=a.tenant,
        upstream_username=a.upstream_username, ssh_upstream_username=a.ssh_upstream_username,
        ftp_upstream_username=a.ftp_upstream_username)
    if ctx.json:
        return account
    return (f"account {account.username} updated: tenant {account.tenant}, protocols "
            f"{','.join(sorted(account.protocols))}, backend user ssh "
            f"{account.backend_username_for('ssh')} / ftp {account.backend_username_for('ftp')}")


async def cmd_cert_remove(ctx: Context) -> Any:
    await ctx.service().remove_certificate(ctx.args.id)
    return {"removed": ctx.args.id} if ctx.json else f"certificate {ctx.args.id} removed"


async def cmd_cert_replace(ctx: Context) -> Any:
    chain = _read_file(ctx.args.cert, "certificate file")
    key = _read_file(ctx.args.key, "key file")
    sites = await ctx.service(keys=True).replace_certificate(ctx.args.id, chain, key)
    if ctx.json:
        return {"id": ctx.args.id, "sites": sites}
    return (f"certificate {ctx.args.id} replaced; {len(sites)} site(s) serve the new one within "
            f"~{ctx.config.cache.change_poll_interval:g} s" + (f": {', '.join(sites)}" if sites
                                                                else ""))


async def cmd_tenant_add(ctx: Context) -> Any:
    tenant = await ctx.service().add_tenant(ctx.args.name, ctx.args.host)
    return tenant if ctx.json else f"tenant {tenant.name} added on host {tenant.host}"


async def cmd_tenant_list(ctx: Context) -> Any:
    assert ctx.store is not None
    tenants = await ctx.store.list_tenants(host=ctx.args.host, after=ctx.args.after,
                                           limit=ctx.args.limit)
    if ctx.json:
        return tenants
    return table([(t.name, t.host, t.state) for t in tenants], ("NAME", "HOST", "STATE"))


async def cmd_tenant_show(ctx: Context) -> Any:
    assert ctx.store is not None
    tenant = await ctx.service().get_tenant(ctx.args.name)
    accounts = await ctx.store.list_accounts(tenant=tenant.name, limit=1000)
    sites = await ctx.store.list_sites(tenant=tenant.name, limit=1000)
    if ctx.json:
        return {"tenant": tenant, "accounts": [a.username for a in accounts],
                "sites": [s.hostname for s in sites]}
    lines = [f"tenant: {tenant.name}", f"host: {tenant.host}", f"state: {tenant.state}"]
    if tenant.previous_host:
        lines.append(f"moved from: {tenant.previous_host} (drain until "
                     f"{iso(tenant.drain_deadline or 0)})")
    lines.append("accounts: " + (", ".join(a.username for a in accounts) or "-"))
    lines.append("sites: " + (", ".join(s.hostname for s in sites) or "-"))
    return "\n".join(lines)


async def cmd_tenant_move(ctx: Context) -> Any:
    drain = parse_duration(ctx.args.drain)
    tenant = await ctx.service().move_tenant(ctx.args.name, ctx.args.to, drain=drain,
                                             force=ctx.args.force)
    if ctx.json:
        return {**to_jsonable(tenant), "drain_seconds": drain}
    return (f"tenant {tenant.name} moved {tenant.previous_host} -> {tenant.host}; new sessions go "
            f"to {tenant.host} within ~{ctx.config.cache.change_poll_interval:g} s, sessions on "
            f"{tenant.previous_host} are closed after {drain:g} s "
            f"(at {iso(tenant.drain_deadline or 0)})")


async def cmd_tenant_set_state(ctx: Context) -> Any:
    tenant = await ctx.service().set_tenant_state(ctx.args.name, ctx.args.state)
    return tenant if ctx.json else f"tenant {tenant.name} is now {tenant.state}"


async def cmd_account_add(ctx: Context) -> Any:
    a = ctx.args
    keys = _read_file(a.authorized_keys, "authorized keys file").decode() \
        if a.authorized_keys else ""
    protocols = [p.strip() for p in a.protocols.split(",") if p.strip()]
    await ctx.service().add_account(a.username, a.tenant, protocols=protocols,
                                    upstream_username=a.upstream_username or "",
                                    authorized_keys=keys,
                                    ssh_upstream_username=a.ssh_upstream_username or "",
                                    ftp_upstream_username=a.ftp_upstream_username or "")
    if ctx.json:
        return {"username": a.username, "tenant": a.tenant, "protocols": sorted(protocols)}
    return f"account {a.username} added to tenant {a.tenant} ({','.join(sorted(protocols))})"


async def cmd_account_list(ctx: Context) -> Any:
    assert ctx.store is not None
    accounts = await ctx.store.list_accounts(tenant=ctx.args.tenant, after=ctx.args.after,
                                             limit=ctx.args.limit)
    if ctx.json:
        return accounts
    return table([(a.username, a.tenant, ",".join(sorted(a.protocols)),
                   a.backend_username_for("ssh"), a.backend_username_for("ftp"),
                   len(a.authorized_keys.splitlines())) for a in accounts],
                 ("USERNAME", "TENANT", "PROTOCOLS", "SSH-UPSTREAM", "FTP-UPSTREAM", "KEYS"))


async def cmd_account_remove(ctx: Context) -> Any:
    await ctx.service().remove_account(ctx.args.username)
    return {"removed": ctx.args.username} if ctx.json else f"account {ctx.args.username} removed"


async def cmd_site_add(ctx: Context) -> Any:
    a = ctx.args
    name = await ctx.service().add_site(
        a.hostname, a.tenant, certificate_id=a.certificate, https_redirect=bool(a.https_redirect),
        hsts=bool(a.hsts), cache_policy=_json_arg(a.cache_policy), filters=_json_arg(a.filters))
    if a.auto_cert or (ctx.config.acme.auto_cert_new_sites and not name.startswith("*.")
                       and a.certificate is None):
        await ctx.service().enable_auto_cert(name)
    return {"hostname": name, "tenant": a.tenant} if ctx.json else \
        f"site {name} added to tenant {a.tenant}"


async def cmd_site_set(ctx: Context) -> Any:
    a = ctx.args
    fields: dict[str, Any] = {}
    if a.certificate is not None:
        fields["certificate_id"] = None if a.certificate == "none" else _int(a.certificate,
                                                                            "--certificate")
    for flag in ("https_redirect", "hsts"):
        if getattr(a, flag) is not None:
            fields[flag] = getattr(a, flag)
    if a.cache_policy is not None:
        fields["cache_policy"] = _json_arg(a.cache_policy)
    if a.filters is not None:
        fields["filters"] = _json_arg(a.filters)
    if a.tenant is not None:
        fields["tenant"] = a.tenant
    if not fields:
        raise ValidationError("nothing to change: give at least one option (see --help)")
    name = await ctx.service().update_site(a.hostname, **fields)
    return {"hostname": name, "changed": sorted(fields)} if ctx.json else \
        f"site {name} updated ({', '.join(sorted(fields))})"


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValidationError(f"{flag} {text!r} is not a number") from None


async def cmd_site_list(ctx: Context) -> Any:
    assert ctx.store is not None
    sites = await ctx.store.list_sites(tenant=ctx.args.tenant, after=ctx.args.after,
                                       limit=ctx.args.limit)
    if ctx.json:
        return sites
    return table([(s.hostname, s.tenant, s.certificate_id or "-", "yes" if s.https_redirect
                   else "no", "yes" if s.hsts else "no", s.cache_policy.get("mode", "off"),
                   ",".join(sorted(s.filters)) or "-") for s in sites],
                 ("HOSTNAME", "TENANT", "CERT", "REDIRECT", "HSTS", "CACHE", "FILTERS"))


async def cmd_site_remove(ctx: Context) -> Any:
    await ctx.service().remove_site(ctx.args.hostname)
    return {"removed": ctx.args.hostname} if ctx.json else f"site {ctx.args.hostname} removed"


async def cmd_cert_import(ctx: Context) -> Any:
    chain = _read_file(ctx.args.cert, "certificate file")
    key = _read_file(ctx.args.key, "key file")
    certificate_id = await ctx.service(keys=True).import_certificate(chain, key)
    if ctx.json:
        return {"id": certificate_id}
    return str(certificate_id)


async def cmd_cert_list(ctx: Context) -> Any:
    assert ctx.store is not None
    certs = await ctx.store.list_certificates(after=ctx.args.after, limit=ctx.args.limit)
    now = time.time()
    if ctx.json:
        return [{"id": c.id, "fingerprint": c.fingerprint, "names": list(c.names),
                 "not_before": iso(c.not_before), "not_after": iso(c.not_after),
                 "expired": c.not_after <= now} for c in certs]
    return table([(c.id, ",".join(c.names), iso(c.not_after),
                   "EXPIRED" if c.not_after <= now else f"{(c.not_after - now) / 86400:.0f} days",
                   c.fingerprint[:16]) for c in certs],
                 ("ID", "NAMES", "NOT-AFTER", "LEFT", "SHA256"))


async def cmd_cache_purge(ctx: Context) -> Any:
    args = ctx.args
    await ctx.service().purge_cache(args.hostname, args.path or "", url=args.url or "",
                                    tag=args.tag or "")
    target = args.hostname + (args.path or args.url or "") + (f" tag {args.tag}" if args.tag else "")
    return {"purged": target} if ctx.json else f"purge of {target} sent to every worker"


async def cmd_route(ctx: Context) -> Any:
    """Resolve a login or hostname exactly as a proxy would (cached read path, no cache here)."""
    from edge.directory.directory import Directory

    assert ctx.store is not None
    directory = Directory(ctx.store, ctx.config.cache)
    target = ctx.args.target
    route: Any
    if ctx.args.account:
        route = await directory.route_for_account(target)
        what = f"account {target}"
    else:
        route = await directory.route_for_site(target)
        what = f"site {target}"
    if route is None:
        raise NotFoundError(f"{what} is not in the directory (a proxy would refuse it)")
    host = route.host
    if ctx.json:
        return {"target": target, "found": True, "tenant": route.tenant, "host": host,
                "matched": getattr(getattr(route, "site", None), "hostname", None)}
    lines = [f"{what} -> tenant {route.tenant.name} ({route.tenant.state}) -> host {host.name} "
             f"{host.address} ({host.state})"]
    site = getattr(route, "site", None)
    if site is not None and site.hostname != target.lower().rstrip("."):
        lines.append(f"matched by {site.hostname}")
    if route.tenant.previous_host:
        lines.append(f"moved from {route.tenant.previous_host}; sessions there drain until "
                     f"{iso(route.tenant.drain_deadline or 0)}")
    return "\n".join(lines)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        return float(number) * units[unit]
    except ValueError:
        raise ValidationError(f"{text!r} is not a duration (e.g. 90s, 15m, 12h, 7d)") from None


async def cmd_changes_list(ctx: Context) -> Any:
    assert ctx.store is not None
    records = await ctx.store.change_records(ctx.args.limit, entity=ctx.args.entity,
                                             name=ctx.args.name)
    if ctx.json:
        return [{"id": c.id, "entity": c.entity, "name": c.name, "at": iso(c.at),
                 "actor": c.actor, "before": c.before, "after": c.after} for c in records]
    return table([(c.id, iso(c.at), c.actor or "-", c.entity, c.name, describe_change(c))
                  for c in records], ("ID", "AT", "ACTOR", "ENTITY", "NAME", "CHANGE"))


def describe_change(change: ChangeRecord, width: int = 60) -> str:
    """One line for a change: ``added``, ``removed``, or ``field: before → after; ...``."""
    if change.before is None and change.after is None:
        return "-"
    if change.before is None:
        return "added"
    if change.after is None:
        return "removed"
    before = change.before
    parts = [f"{key}: {_short(before[key], width)} → {_short(value, width)}" if key in before
             else f"{key}: {_short(value, width)}" for key, value in sorted(change.after.items())]
    return "; ".join(parts) or "-"


def _short(value: Any, width: int) -> str:
    text = "''" if value == "" else json.dumps(value) if isinstance(value, dict | list) \
        else str(value)
    text = " ".join(text.split())  # known_hosts and rules are multi-line; a table row is not
    return text if len(text) <= width else text[:width - 1] + "…"


async def cmd_changes_prune(ctx: Context) -> Any:
    removed = await ctx.service().prune_changes(parse_duration(ctx.args.older_than))
    return {"removed": removed} if ctx.json else f"removed {removed} change-feed rows"


async def cmd_bulk_load(ctx: Context) -> Any:
    from edge.directory.bulk import bulk_load

    assert ctx.store is not None
    started = time.perf_counter()
    counts = await bulk_load(ctx.store, ctx.args.file, keybox=ctx.keybox(required=False),
                             auto_cert=ctx.args.auto_cert or ctx.config.acme.auto_cert_new_sites)
    elapsed = time.perf_counter() - started
    if ctx.json:
        return {"counts": counts, "seconds": round(elapsed, 3)}
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    return f"loaded {summary} in {elapsed:.1f} s"


def cmd_schema(args: argparse.Namespace) -> int:
    from edge.directory.schema import render_all

    sys.stdout.write(render_all(args.dialect))
    return 0


def cmd_secret_generate(args: argparse.Namespace) -> int:
    print(generate_key())
    return 0


async def cmd_secret_rotate(ctx: Context) -> Any:
    done, current = await ctx.service(keys=True).rotate_secret_key()
    if ctx.json:
        return {"reencrypted": done, "already_current": current}
    return (f"re-encrypted {done} private keys under the current secret key "
            f"({current} already were); previous_key_files can now be removed")


def cmd_serve(args: argparse.Namespace, config: EdgeConfig) -> int:
    from edge.serve.supervisor import serve

    only = {p.strip() for p in args.only.split(",") if p.strip()} if args.only else None
    asyncio.run(_serve_preflight(config))
    return int(serve(config, workers=args.workers, only=only))


async def _serve_preflight(config: EdgeConfig) -> None:
    """`edge serve` never migrates (edge-migrate.service does, once per deploy) but refuses a
    directory whose schema it cannot read. A database that is down is not refused here: the
    workers serve from their caches and reconnect (see docs/reliability.md)."""
    store = store_for_url(config.database.read_url, config.database)
    try:
        await store.open()
    except DirectoryUnavailable:
        return
    try:
        await require_current_schema(store)
    except DirectoryUnavailable:
        return
    finally:
        await store.close()


def cmd_demo(args: argparse.Namespace, config: EdgeConfig) -> int:
    from edge.demo import run_demo

    return run_demo(args)


# -- parser ---------------------------------------------------------------------------------

def _leaf(sub: Any, name: str, handler: Handler | Callable[..., int], help: str,
          **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help,
                                                     parents=[_COMMON], **kwargs)
    parser.set_defaults(handler=handler)
    return parser


def _paging(parser: argparse.ArgumentParser, after: str = "") -> None:
    parser.add_argument("--limit", type=int, default=1000, help="at most this many rows (1000)")
    parser.add_argument("--after", default=after, help="start after this name (paging)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge", parents=[_COMMON],
        description="hosting edge: SSH, FTP and HTTP(S) proxies routed by a tenant directory.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _leaf(sub, "init", cmd_init, "create or migrate the directory schema (idempotent); "
              "with [ssh] listen set, also create missing SSH proxy keys")
    p.add_argument("--ssh-keys", action="store_true",
                   help="create missing SSH proxy host/upstream keys even if [ssh] listen is empty")
    _leaf(sub, "migrate", cmd_migrate, "only create or migrate the directory schema "
          "(what a deploy runs once; `edge serve` never changes the schema)")
    _check_parser(sub)
    p = _leaf(sub, "schema", cmd_schema, "print the schema as SQL")
    p.add_argument("--dialect", choices=("sqlite", "mysql"), default="mysql")

    secret = sub.add_parser("secret", help="the at-rest key for TLS private keys")
    secret_sub = secret.add_subparsers(dest="action", metavar="ACTION", required=True)
    _leaf(secret_sub, "generate", cmd_secret_generate,
          "print a new random key for $EDGE_SECRET_KEY / [secrets] key_file")
    _leaf(secret_sub, "rotate", cmd_secret_rotate,
          "re-encrypt every stored private key under the current secret key (the old key in "
          "[secrets] previous_key_files); idempotent")

    host = sub.add_parser("host", help="backend hosts")
    hs = host.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _leaf(hs, "add", cmd_host_add, "add a backend host")
    p.add_argument("name")
    p.add_argument("--address", required=True, help="IP address or hostname of the backend")
    for proto, port in (("ssh", 22), ("ftp", 21), ("http", 80), ("https", 443)):
        p.add_argument(f"--{proto}-port", type=int, default=port, help=f"default {port}")
    p.add_argument("--send-proxy-protocol", choices=("off", "v1", "v2"), default="off",
                   help="send a PROXY header to this host's backends")
    _bool_flag(p, "--backend-tls", "speak TLS to this host's FTP/HTTP backends")
    _bool_flag(p, "--ssh-insecure", "do not verify this host's SSH host key (not recommended)")
    _leaf(hs, "list", cmd_host_list, "list hosts")
    p = _leaf(hs, "show", cmd_host_show, "show one host")
    p.add_argument("name")
    p = _leaf(hs, "set-state", cmd_host_set_state, "set a host active, in maintenance or down")
    p.add_argument("name")
    p.add_argument("state", choices=HOST_STATES)
    p.add_argument("--notice", help="text users see while the host is in maintenance")
    p.add_argument("--until", metavar="TIME", help="maintenance only: when it ends by itself "
                   "(ISO 8601, UTC unless given, e.g. 2026-12-08T06:00Z, or +2h)")
    _host_set_parser(hs)
    p = _leaf(hs, "remove", cmd_host_remove,
              "remove a host (refused while tenants live there or drain from it)")
    p.add_argument("name")
    live.add_host_drain(hs, _leaf)
    p = _leaf(hs, "pin-ssh-key", cmd_host_pin_ssh_key,
              "fetch a host's SSH host keys, show fingerprints, pin them for the SSH proxy")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="pin without asking (checked fingerprints)")

    tenant = sub.add_parser("tenant", help="tenants (customers)")
    ts = tenant.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _leaf(ts, "add", cmd_tenant_add, "add a tenant on a host")
    p.add_argument("name")
    p.add_argument("--host", required=True)
    p = _leaf(ts, "list", cmd_tenant_list, "list tenants")
    p.add_argument("--host", help="only tenants on this host")
    _paging(p)
    p = _leaf(ts, "show", cmd_tenant_show, "show a tenant with its accounts and sites")
    p.add_argument("name")
    p = _leaf(ts, "move", cmd_tenant_move,
              "move a tenant to another host; every proxy routes there within ~1 s")
    p.add_argument("name")
    p.add_argument("--to", required=True, metavar="HOST")
    p.add_argument("--drain", default=f"{DEFAULT_MOVE_DRAIN:g}s", metavar="DURATION",
                   help="close sessions still open on the old host after this long, e.g. 0, "
                        f"90s, 15m ({DEFAULT_MOVE_DRAIN:g}s)")
    p.add_argument("--force", action="store_true",
                   help="move even onto a host that is down or in maintenance")
    p = _leaf(ts, "set-state", cmd_tenant_set_state, "suspend or re-activate a tenant")
    p.add_argument("name")
    p.add_argument("state", choices=TENANT_STATES)
    p = _leaf(ts, "remove", cmd_tenant_remove,
              "remove a tenant (refused while it has sites or accounts, unless --cascade)")
    p.add_argument("name")
    p.add_argument("--cascade", action="store_true",
                   help="also remove its sites and accounts (each proxy forgets them)")

    account = sub.add_parser("account", help="SSH/FTP logins")
    acs = account.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _leaf(acs, "add", cmd_account_add, "add a login to a tenant")
    p.add_argument("username")
    p.add_argument("--tenant", required=True)
    p.add_argument("--protocols", default="ssh,ftp", help="comma list of ssh, ftp (both)")
    _upstream_flags(p)
    p.add_argument("--authorized-keys", metavar="FILE",
                   help="OpenSSH authorized_keys file for public-key login")
    _account_set_parser(acs)
    p = _leaf(acs, "list", cmd_account_list, "list accounts")
    p.add_argument("--tenant")
    _paging(p)
    p = _leaf(acs, "remove", cmd_account_remove, "remove an account")
    p.add_argument("username")

    site = sub.add_parser("site", help="websites (hostnames)")
    ss = site.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, handler, help_text in (("add", cmd_site_add, "add a site (hostname or *.domain)"),
                                     ("set", cmd_site_set, "change a site's settings")):
        p = _leaf(ss, name, handler, help_text)
        p.add_argument("hostname")
        if name == "add":
            p.add_argument("--tenant", required=True)
            p.add_argument("--certificate", type=int, metavar="ID")
            p.add_argument("--auto-cert", action="store_true",
                           help="get and renew its certificate automatically over ACME")
        else:
            p.add_argument("--tenant", help="give the site to another tenant")
            p.add_argument("--certificate", metavar="ID|none")
        _bool_flag(p, "--https-redirect", "redirect http:// to https://")
        _bool_flag(p, "--hsts", "send Strict-Transport-Security")
        p.add_argument("--cache-policy", metavar="JSON|@FILE", help="cache policy rules")
        p.add_argument("--filters", metavar="JSON|@FILE", help="filter rules")
    p = _leaf(ss, "list", cmd_site_list, "list sites")
    p.add_argument("--tenant")
    _paging(p)
    p = _leaf(ss, "remove", cmd_site_remove, "remove a site")
    p.add_argument("hostname")

    cert = sub.add_parser("cert", help="TLS certificates")
    cs = cert.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _leaf(cs, "import", cmd_cert_import,
              "validate and store a certificate chain and key (key encrypted); prints the id")
    p.add_argument("--cert", required=True, metavar="FILE", help="PEM chain, leaf first")
    p.add_argument("--key", required=True, metavar="FILE", help="PEM private key")
    p = _leaf(cs, "replace", cmd_cert_replace,
              "rotate a certificate in place (same id): every site using it serves the new one")
    p.add_argument("id", type=int)
    p.add_argument("--cert", required=True, metavar="FILE", help="PEM chain, leaf first")
    p.add_argument("--key", required=True, metavar="FILE", help="PEM private key")
    p = _leaf(cs, "remove", cmd_cert_remove, "remove a certificate (refused while sites use it)")
    p.add_argument("id", type=int)
    p = _leaf(cs, "list", cmd_cert_list, "list certificates")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--after", type=int, default=0, metavar="ID")
    acme_cli.add_cert_parsers(cs, _leaf)
    acme_cli.add_acme_parsers(sub, _leaf)

    cache = sub.add_parser("cache", help="the HTTP content cache")
    cas = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _leaf(cas, "purge", cmd_cache_purge, "drop a site's cached objects on every worker")
    p.add_argument("hostname")
    p.add_argument("--path", help="only objects under this path prefix")
    p.add_argument("--url", help="only this request-target (/path?query) on HOSTNAME, every "
                   "variant and scheme")
    p.add_argument("--tag", help="only objects the site tagged so (Cache-Tag, Surrogate-Key)")

    changes = sub.add_parser("changes", help="the change feed every proxy follows")
    chs = changes.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _leaf(chs, "list", cmd_changes_list,
              "the newest changes: what changed (before → after), when, and who changed it")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--entity", choices=("host", "tenant", "account", "site", "certificate",
                                        "purge", "all"), help="only changes of this kind")
    p.add_argument("--name", help="only changes of this object (with --entity)")
    p = _leaf(chs, "prune", cmd_changes_prune,
              "delete change rows older than a duration (keeps the newest); run from cron")
    p.add_argument("--older-than", required=True, metavar="DURATION", help="e.g. 7d, 12h")

    p = _leaf(sub, "route", cmd_route,
              "show where a hostname (or, with --account, a login) is routed right now")
    p.add_argument("target", metavar="HOSTNAME|USERNAME")
    p.add_argument("--account", action="store_true", help="TARGET is an SSH/FTP login")

    p = _leaf(sub, "bulk-load", cmd_bulk_load,
              "load hosts/tenants/accounts/sites/certificates from a JSON Lines file, fast")
    p.add_argument("file")
    p.add_argument("--auto-cert", action="store_true",
                   help="automatic certificates (ACME) for every site of the file without a "
                        "certificate, wildcards aside (a record's \"auto_cert\" decides for it)")

    admin_commands.register(sub, _leaf)

    p = _leaf(sub, "serve", cmd_serve, "run the proxies and the admin listener")
    p.add_argument("--workers", type=int, help="worker processes (default [serve] workers)")
    p.add_argument("--only", metavar="LIST", help="comma list of proxies to run: ssh,ftp,http,https")

    live.add_commands(sub, _leaf)

    p = _leaf(sub, "demo", cmd_demo,
              "set up a demo directory with local backends and run the proxies")
    p.add_argument("--dir", default=".edge-demo", help="where the demo keeps its files")
    p.add_argument("--duration", type=float, default=0,
                   help="stop after this many seconds (0: until Ctrl-C)")
    p.add_argument("--reset", action="store_true",
                   help="start from scratch: remove the demo directory (directory, keys) first")
    return parser


def _host_set_parser(hs: Any) -> None:
    p = _leaf(hs, "set", cmd_host_set, "change a host's address, ports, PROXY protocol, notice")
    p.add_argument("name")
    p.add_argument("--address", help="IP address or hostname of the backend")
    for proto in ("ssh", "ftp", "http", "https"):
        p.add_argument(f"--{proto}-port", type=int)
    p.add_argument("--send-proxy-protocol", choices=("off", "v1", "v2"))
    p.add_argument("--notice", help="text users see while the host is in maintenance")
    _bool_flag(p, "--backend-tls", "speak TLS to this host's FTP/HTTP backends")
    _bool_flag(p, "--ssh-insecure", "do not verify this host's SSH host key (not recommended)")


def _upstream_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upstream-username",
                   help="name on the backend for every protocol (default: the same)")
    p.add_argument("--ssh-upstream-username", help="name on the backend for SSH only")
    p.add_argument("--ftp-upstream-username", help="name on the backend for FTP only")


def _account_set_parser(acs: Any) -> None:
    p = _leaf(acs, "set", cmd_account_set,
              "change an account's keys, protocols, tenant or upstream usernames "
              "('' resets an upstream username to the default)")
    p.add_argument("username")
    p.add_argument("--protocols", help="comma list of ssh, ftp")
    p.add_argument("--tenant", help="give the account to another tenant")
    _upstream_flags(p)
    p.add_argument("--authorized-keys", metavar="FILE|none",
                   help="replace the public keys with this authorized_keys file (none: remove)")


def _check_parser(sub: Any) -> None:
    from edge.check import DEFAULT_EXPIRY_DAYS

    p = _leaf(sub, "check", cmd_check, "validate the configuration and the directory, like "
              "nginx -t: exits non-zero with the list of problems")
    p.add_argument("--days", type=int, default=DEFAULT_EXPIRY_DAYS,
                   help=f"flag certificates expiring within N days ({DEFAULT_EXPIRY_DAYS})")
    p.add_argument("--timeout", type=float, default=2.0,
                   help="seconds to wait for each backend port (2)")
    p.add_argument("--no-connect", action="store_true",
                   help="do not probe the backend hosts' ports")


async def cmd_check(ctx: Context) -> Any:
    from edge.check import CheckOptions, run_checks

    assert ctx.store is not None
    options = CheckOptions(days=ctx.args.days, connect_timeout=ctx.args.timeout,
                           connect=not ctx.args.no_connect)
    findings = await run_checks(ctx.config, ctx.store, options)
    problems = [f for f in findings if f.severity == "error"]
    if ctx.json:
        emit_json({"ok": not problems, "findings": findings})
    else:
        for finding in findings:
            print(finding.line())
        print(f"edge check: {len(problems)} problem(s), "
              f"{len(findings) - len(problems)} warning(s)" if findings else
              "edge check: configuration and directory OK")
    if problems:
        raise CheckFailed(f"{len(problems)} problem(s) found (listed above)")
    return None


class CheckFailed(EdgeError):
    """``edge check`` found problems (already printed, so the message is short)."""

    exit_code = 1


_NEEDS_STORE = {cmd_init, cmd_host_add, cmd_host_list, cmd_host_show, cmd_host_set_state,
                cmd_host_pin_ssh_key,
                cmd_tenant_add, cmd_tenant_list, cmd_tenant_show, cmd_tenant_move,
                cmd_tenant_set_state, cmd_account_add, cmd_account_list, cmd_account_remove,
                cmd_site_add, cmd_site_set, cmd_site_list, cmd_site_remove, cmd_cert_import,
                cmd_cert_list, cmd_cache_purge, cmd_bulk_load, cmd_route,
                cmd_changes_list, cmd_changes_prune, cmd_secret_rotate, *live.NEEDS_STORE,
                *acme_cli.HANDLERS}


async def _run_async(handler: Handler, ctx: Context) -> Any:
    store = store_for_url(ctx.config.database.url, ctx.config.database)
    await store.open()
    ctx.store = store
    try:
        if handler not in (cmd_init, cmd_migrate):
            await require_current_schema(store)
        return await handler(ctx)
    finally:
        await store.close()


async def require_current_schema(store: SQLStore) -> None:
    """Refuse to work on a directory whose schema this edge does not know how to read."""
    from edge.directory.schema import SCHEMA_VERSION

    version = await store.schema_version()
    if version == 0:
        raise EdgeError(f"the directory {_safe_url(store.url)} has no schema yet: "
                        "run `edge init` first")
    if version < SCHEMA_VERSION:
        raise EdgeError(f"the directory {_safe_url(store.url)} has schema version {version}, "
                        f"this edge needs {SCHEMA_VERSION}: run `edge migrate` first")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(getattr(args, "config", None),
                             database_url=getattr(args, "database", None))
        handler = args.handler
        if handler in (cmd_schema, cmd_secret_generate):
            return int(handler(args))
        if handler in (cmd_serve, cmd_demo):
            return int(handler(args, config))
        ctx = Context(args, config)
        run = handler(ctx) if handler in live.NO_STORE else _run_async(handler, ctx)
        result = asyncio.run(run)
    except EdgeError as exc:
        print(f"edge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    try:
        if ctx.json:
            emit_json(result)
        elif result is not None:
            print(result)
        sys.stdout.flush()
    except BrokenPipeError:
        # `edge site list | head`: the reader left; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _fields(obj: Any) -> dict[str, Any]:
    from edge.cli.output import to_jsonable

    data: dict[str, Any] = to_jsonable(obj)
    return {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in data.items()}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
