"""``edge token add/list/remove`` and ``edge admin serve`` (the admin API and console)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from edge.cli.output import table
from edge.config import ApiConfig, ListenAddress
from edge.directory.service import iso
from edge.directory.tokens import SCOPES, TokenService
from edge.errors import ConfigError


def _tokens(ctx: Any) -> TokenService:
    return TokenService(ctx.store)


async def cmd_token_add(ctx: Any) -> Any:
    new = await _tokens(ctx).add(ctx.args.name, ctx.args.scope)
    scopes = ",".join(sorted(new.token.scopes))
    if ctx.json:
        return {"name": new.token.name, "scopes": sorted(new.token.scopes), "token": new.secret}
    print(f"token {new.token.name} ({scopes}) created; it is shown only now, store it:",
          file=sys.stderr)
    return new.secret


async def cmd_token_list(ctx: Any) -> Any:
    tokens = await _tokens(ctx).list()
    if ctx.json:
        return [{"name": t.name, "scopes": sorted(t.scopes), "created_at": iso(t.created_at)}
                for t in tokens]
    return table([(t.name, ",".join(sorted(t.scopes)), iso(t.created_at)) for t in tokens],
                 ("NAME", "SCOPES", "CREATED"))


async def cmd_token_remove(ctx: Any) -> Any:
    await _tokens(ctx).remove(ctx.args.name)
    return {"removed": ctx.args.name} if ctx.json else f"token {ctx.args.name} removed"


def api_config(ctx: Any) -> ApiConfig:
    """``[api]`` with the command-line flags applied (validated again: TLS off loopback)."""
    config: ApiConfig = ctx.config.api
    args = ctx.args
    changes: dict[str, Any] = {}
    try:
        if args.listen:
            changes["listen"] = tuple(ListenAddress.parse(a) for a in args.listen)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    if args.tls_cert:
        changes["certificate_file"] = args.tls_cert
    if args.tls_key:
        changes["key_file"] = args.tls_key
    return dataclasses.replace(config, **changes)


async def cmd_admin_serve(ctx: Any) -> Any:
    from edge.api.server import serve_api

    config = ctx.config.replace(api=api_config(ctx))

    def ready(urls: list[str]) -> None:
        for url in urls:
            print(f"edge admin API on {url}/api/v1 (OpenAPI: {url}/api/openapi.json), "
                  f"console on {url}/console/", flush=True)

    await serve_api(config, ctx.store, ctx.keybox(required=False), on_ready=ready)
    return None


def register(sub: Any, leaf: Any) -> None:
    """Add the ``token`` and ``admin`` commands (``leaf`` is main's subcommand helper)."""
    token = sub.add_parser("token", help="bearer tokens for the admin API and console")
    ts = token.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(ts, "add", cmd_token_add, "create a token and print it (only this once)")
    p.add_argument("name")
    p.add_argument("--scope", required=True, metavar="LIST",
                   help=f"comma list of {', '.join(SCOPES)}")
    leaf(ts, "list", cmd_token_list, "list tokens (names and scopes, never the secrets)")
    p = leaf(ts, "remove", cmd_token_remove, "revoke a token")
    p.add_argument("name")

    admin = sub.add_parser("admin", help="the admin HTTP API and web console")
    ads = admin.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(ads, "serve", cmd_admin_serve,
             "serve the admin API and console (default 127.0.0.1:9901, [api] in the config)")
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="address to bind (repeatable); off loopback needs --tls-cert")
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain for HTTPS")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key (default: in --tls-cert)")


__all__ = ["register"]
