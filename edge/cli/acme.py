"""``edge acme account ...`` and ``edge cert issue|renew|revoke|status`` (automatic certificates)."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge.cli.output import table
from edge.directory.service import ACME_KEY_TYPES, iso
from edge.errors import EdgeError, ValidationError

if TYPE_CHECKING:
    from edge.acme.issuer import Issuer
    from edge.cli.main import Context
    from edge.directory.model import AcmeName

KNOWN_DIRECTORIES = {
    "letsencrypt": ("https://acme-v02.api.letsencrypt.org/directory", "production"),
    "letsencrypt-staging": ("https://acme-staging-v02.api.letsencrypt.org/directory", "staging"),
    "zerossl": ("https://acme.zerossl.com/v2/DV90", "production"),
}
"""``--directory`` shortcuts; any other value is taken as the directory URL."""


class AcmeCommandError(EdgeError):
    """An ACME operation the operator asked for failed (the CA's text)."""

    exit_code = 1


def _issuer(ctx: Context) -> Issuer:
    from edge.acme.issuer import Issuer

    service = ctx.service(keys=True)
    assert service.keybox is not None
    return Issuer(service, ctx.config.acme, service.keybox)


async def cmd_account_add(ctx: Context) -> Any:
    from edge.acme import client

    a = ctx.args
    url, environment = KNOWN_DIRECTORIES.get(a.directory, (a.directory, "production"))
    if a.staging:
        environment = "staging"
    service = ctx.service(keys=True)
    try:
        registered = await asyncio.to_thread(
            client.register, url, ca_file=ctx.config.acme.ca_file, email=a.email or "",
            eab_kid=a.eab_kid or "", eab_hmac=a.eab_hmac or "")
    except client.AcmeFailure as exc:
        raise AcmeCommandError(f"registering at {url} failed: {exc}") from None
    account = await service.add_acme_account(
        a.name, url, registered.key_pem, account_url=registered.account_url,
        priority=a.priority, eab_kid=a.eab_kid or "", email=a.email or "",
        environment=environment)
    if ctx.json:
        return {"name": account.name, "directory": url, "account_url": account.account_url,
                "environment": environment, "priority": account.priority}
    return f"ACME account {account.name} registered at {url} ({environment}, priority " \
           f"{account.priority}): {account.account_url}"


async def cmd_account_list(ctx: Context) -> Any:
    accounts = await ctx.service().acme_accounts()
    now = time.time()
    if ctx.json:
        return [{"name": a.name, "directory": a.directory_url, "environment": a.environment,
                 "priority": a.priority, "account_url": a.account_url,
                 "eab": bool(a.eab_kid), "failures": a.failures,
                 "backoff_seconds": max(0.0, a.next_attempt - now),
                 "last_error": a.last_error} for a in accounts]
    return table([(a.name, a.priority, a.environment, a.directory_url,
                   f"{a.next_attempt - now:.0f}s" if a.next_attempt > now else "-",
                   a.last_error[:80] or "-") for a in accounts],
                 ("NAME", "PRIORITY", "ENV", "DIRECTORY", "BACKOFF", "LAST-ERROR"))


async def cmd_issue(ctx: Context) -> Any:
    a = ctx.args
    issuer = _issuer(ctx)
    name = await issuer.service.enable_auto_cert(a.hostname, a.key_type)
    outcome = await issuer.issue(name.hostname)
    return _outcomes(ctx, [outcome])


async def cmd_renew(ctx: Context) -> Any:
    a = ctx.args
    issuer = _issuer(ctx)
    if a.due == bool(a.hostname):
        raise ValidationError("give a HOSTNAME or --due (every name whose renewal time passed)")
    if a.due:
        outcomes = await issuer.run_due(limit=a.limit)
    else:
        await issuer.service.request_acme_renewal(a.hostname)
        outcomes = [await issuer.issue(a.hostname)]
    return _outcomes(ctx, outcomes)


async def cmd_revoke(ctx: Context) -> Any:
    """Revoke a name's current certificate at the CA that issued it; the name falls due at
    once, so the next issuance (``edge serve`` or ``edge cert renew``) replaces it."""
    from edge.acme import client

    service = ctx.service(keys=True)
    assert service.keybox is not None and ctx.store is not None
    name = await service.acme_name(ctx.args.hostname)
    if name.certificate_id is None:
        raise ValidationError(f"{name.hostname} has no issued certificate to revoke")
    stored = await ctx.store.fetch_certificate(name.certificate_id)
    account = next((x for x in await service.acme_accounts() if x.name == name.account), None)
    if stored is None or account is None:
        raise ValidationError(f"{name.hostname}: certificate or issuing account is gone")
    keybox = service.keybox

    def run() -> None:
        acme = client.connect(account.directory_url, keybox.decrypt(account.key_encrypted),
                              account.account_url, ca_file=ctx.config.acme.ca_file)
        client.revoke(acme, stored.chain_pem, ctx.args.reason)

    try:
        await asyncio.to_thread(run)
    except client.AcmeFailure as exc:
        raise AcmeCommandError(f"revoking certificate {stored.id} failed: {exc}") from None
    await service.request_acme_renewal(name.hostname)
    return {"revoked": stored.id, "hostname": name.hostname} if ctx.json else \
        f"certificate {stored.id} of {name.hostname} revoked; {name.hostname} is due for renewal"


async def cmd_status(ctx: Context) -> Any:
    a = ctx.args
    names = await ctx.service().acme_names(failing=a.failing, after=a.after, limit=a.limit)
    now = time.time()
    if ctx.json:
        return [{"hostname": n.hostname, "state": n.state, "key_type": n.key_type,
                 "certificate_id": n.certificate_id,
                 "renew_at": iso(n.renew_at) if n.certificate_id else None,
                 "failures": n.failures, "orders": n.orders, "account": n.account,
                 "next_attempt": _retry_at(n, now),
                 "renewal_info_check": _ari_check(n, now),
                 "last_error": n.last_error,
                 "lease_owner": n.lease_owner if n.lease_until > now else ""} for n in names]
    return table([(n.hostname, n.state, n.certificate_id or "-",
                   iso(n.renew_at) if n.certificate_id else "-", n.failures,
                   _retry_at(n, now) or "-", n.last_error[:100] or "-") for n in names],
                 ("HOSTNAME", "STATE", "CERT", "RENEW-AT", "FAILURES", "RETRY-AT", "LAST-ERROR"))


def _retry_at(name: AcmeName, now: float) -> str | None:
    """When a failing (or new) name is tried again: its back-off or the CA's Retry-After."""
    return iso(name.next_attempt) if name.state != "valid" and name.next_attempt > now else None


def _ari_check(name: AcmeName, now: float) -> str | None:
    """When the CA's renewal information is asked again for a valid name (None: not before
    its renewal; the CA offers no ARI)."""
    return iso(name.next_attempt) if (
        name.state == "valid" and now < name.next_attempt < name.renew_at) else None


def _outcomes(ctx: Context, outcomes: list[Any]) -> Any:
    due = bool(getattr(ctx.args, "due", False))
    if ctx.json:
        return [{"hostname": o.hostname, "ok": o.ok, "skipped": o.skipped, "result": o.text}
                for o in outcomes]
    # With --due a name another process is working on is not this command's failure.
    failed = [o for o in outcomes if not o.ok and not (due and o.skipped)]
    lines = [f"{o.hostname}: skipped: {o.text}" if o.skipped else
             f"{o.hostname}: certificate {o.text}" if o.ok else f"{o.hostname}: FAILED: {o.text}"
             for o in outcomes]
    if failed:
        raise AcmeCommandError("\n".join(lines))
    return "\n".join(lines) or "nothing due"


HANDLERS = {cmd_account_add, cmd_account_list, cmd_issue, cmd_renew, cmd_revoke, cmd_status}


def add_cert_parsers(cs: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    """``edge cert issue|renew|revoke|status`` under the existing ``cert`` command."""
    p = leaf(cs, "issue", cmd_issue, "get a certificate for a site from the ACME CA now "
             "(marks it --auto-cert: renewed automatically from then on)")
    p.add_argument("hostname")
    p.add_argument("--key-type", choices=ACME_KEY_TYPES, default="ec256",
                   help="certificate key: ECDSA P-256 (default) or RSA")
    p = leaf(cs, "renew", cmd_renew, "renew one name now, or every name that is due (--due)")
    p.add_argument("hostname", nargs="?")
    p.add_argument("--due", action="store_true", help="every name whose renewal time passed")
    p.add_argument("--limit", type=int, default=1000)
    p = leaf(cs, "revoke", cmd_revoke, "revoke a name's current certificate at its CA")
    p.add_argument("hostname")
    p.add_argument("--reason", type=int, default=0, help="RFC 5280 reason code (0)")
    p = leaf(cs, "status", cmd_status, "automatic certificates: state, renewal, CA errors")
    p.add_argument("--failing", action="store_true", help="only names whose last attempt failed")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--after", default="")


def add_acme_parsers(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    """``edge acme account add|list``."""
    acme = sub.add_parser("acme", help="ACME certificate authorities (accounts)")
    acs = acme.add_subparsers(dest="object", metavar="OBJECT", required=True)
    account = acs.add_parser("account", help="accounts at ACME CAs")
    accs = account.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = leaf(accs, "add", cmd_account_add, "register an account at an ACME CA and store it "
             "(key encrypted at rest)")
    p.add_argument("name", help="a name for this account, e.g. letsencrypt")
    p.add_argument("--directory", required=True, metavar="URL",
                   help="the CA's directory URL, or " + ", ".join(KNOWN_DIRECTORIES))
    p.add_argument("--priority", type=int, default=0,
                   help="lower is tried first: the primary CA 0, fallbacks higher")
    p.add_argument("--staging", action="store_true", help="a staging (test) CA account")
    p.add_argument("--email", help="contact address for the CA")
    p.add_argument("--eab-kid", help="External Account Binding key id (ZeroSSL, Google)")
    p.add_argument("--eab-hmac", help="External Account Binding HMAC key (base64url)")
    leaf(accs, "list", cmd_account_list, "list ACME accounts and their back-off")
