"""RFC 8555 on certbot's ``acme`` package: register, order, answer, finalize, revoke.

Everything here is blocking (``acme`` uses ``requests``) and runs in a thread
(:mod:`edge.acme.issuer` calls it through ``asyncio.to_thread``); nothing here touches the
directory: challenge answers are handed to a ``publish`` callback. Failures are raised as
:class:`AcmeFailure` with the CA's own error text and whether they concern the whole account
(CA unreachable, rate limited: try the fallback CA, back off the account) or only this name.
"""

from __future__ import annotations

import base64
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from acme import challenges, crypto_util, errors, messages
from acme import client as acme_client
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy import json_util as jose
from josepy.errors import Error as JoseError
from josepy.jwa import ES256, RS256, JWASignature
from josepy.jwk import JWK, JWKEC, JWKRSA

USER_AGENT = "hosting-edge-acme"

KEY_TYPES = ("ec256", "rsa2048", "rsa4096")


class AcmeFailure(Exception):
    """An order or account operation failed; ``str()`` is the CA's text."""

    def __init__(self, text: str, *, account_wide: bool = False, retry_after: float = 0.0,
                 kind: str = "error") -> None:
        super().__init__(text)
        self.account_wide = account_wide
        """True when the CA as a whole failed us (down, rate limited, account problem)."""
        self.retry_after = retry_after
        """Seconds the CA asked us to wait (0: unknown)."""
        self.kind = kind
        """For metrics: ``unreachable``, ``rate_limited``, ``validation``, ``rejected``,
        ``timeout``."""


@dataclass(frozen=True, slots=True)
class Registered:
    key_pem: bytes
    account_url: str


@dataclass(frozen=True, slots=True)
class Issued:
    chain_pem: bytes
    key_pem: bytes
    not_before: float
    not_after: float
    advice: RenewalAdvice
    """The CA's renewal information for it (ARI, RFC 9773)."""


@dataclass(frozen=True, slots=True)
class RenewalAdvice:
    """What the CA's ACME Renewal Information says about one certificate."""

    renew_at: float | None
    """A time in the CA's suggested window, or None when the CA offers no ARI."""
    check_at: float | None
    """When to ask again (the answer's ``Retry-After``); None: the CA offers no ARI."""


Publish = Callable[[str, str, str], None]
"""``publish(token, hostname, key_authorization)``: make every edge worker serve an answer."""


def new_private_key(key_type: str) -> bytes:
    """A new certificate key in PEM (PKCS#8): ECDSA P-256 by default, RSA on request."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "ec256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type in ("rsa2048", "rsa4096"):
        key = rsa.generate_private_key(65537, int(key_type[3:]))
    else:
        raise ValueError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """RFC 8737 response (an empty object on the wire). ``acme`` 5 dropped TLS-ALPN-01; the
    edge answers it itself (httpproxy/acme.py), so only the message types are defined here."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **kwargs: Any) -> str:
        """The key authorization; the edge puts its SHA-256 into the challenge certificate."""
        return self.key_authorization(account_key)


def _jwk(key_pem: bytes) -> tuple[JWK, JWASignature]:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return JWKEC(key=key), ES256
    return JWKRSA(key=key), RS256


class _Network(acme_client.ClientNetwork):
    """``acme``'s network with the CA's last refusal remembered: ``acme`` raises the problem
    document alone, without the response's ``Retry-After`` (RFC 8555 §6.6). Only a public
    hook of ``requests`` is used (no ``acme`` internals)."""

    def __init__(self, key: JWK, alg: JWASignature, timeout: int) -> None:
        super().__init__(key, alg=alg, user_agent=USER_AGENT, timeout=timeout)
        self.refused_status = 0
        """HTTP status of the CA's last 429/503 answer (0: none yet)."""
        self.refused_retry_after = 0.0
        """Seconds that answer's ``Retry-After`` asked for (0: none given)."""
        self.session.hooks["response"].append(self._remember)

    def _remember(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        if response.status_code in (429, 503):
            self.refused_status = response.status_code
            self.refused_retry_after = retry_after_seconds(response)


def retry_after_seconds(response: requests.Response) -> float:
    """The response's ``Retry-After`` (seconds or HTTP date) in seconds from now; 0 if none."""
    if "Retry-After" not in response.headers:
        return 0.0
    when = acme_client.ClientV2.retry_after(response, 0)
    return max(0.0, (when - datetime.datetime.now()).total_seconds())


def _network(key_pem: bytes, ca_file: str, timeout: int) -> _Network:
    jwk, alg = _jwk(key_pem)
    net = _Network(jwk, alg, timeout)
    if ca_file:
        # requests takes a CA bundle path where acme's type says bool.
        net.verify_ssl = ca_file  # type: ignore[assignment]
    return net


def connect(directory_url: str, key_pem: bytes, account_url: str, *, ca_file: str = "",
            timeout: int = 30) -> acme_client.ClientV2:
    """A client for an existing account. Raises AcmeFailure (account-wide) if the CA is
    unreachable."""
    net = _network(key_pem, ca_file, timeout)
    with _translated(net):
        directory = acme_client.ClientV2.get_directory(directory_url, net)
    if account_url:
        net.account = messages.RegistrationResource(uri=account_url,
                                                    body=messages.Registration())
    return acme_client.ClientV2(directory, net)


def register(directory_url: str, *, ca_file: str = "", email: str = "", eab_kid: str = "",
             eab_hmac: str = "") -> Registered:
    """Create an account key (ECDSA P-256) and register it, with External Account Binding
    when ``eab_kid``/``eab_hmac`` are given (ZeroSSL, Google). Raises AcmeFailure."""
    key_pem = new_private_key("ec256")
    client = connect(directory_url, key_pem, "", ca_file=ca_file)
    eab: Any = None
    if eab_kid or eab_hmac:
        if not (eab_kid and eab_hmac):
            raise AcmeFailure("External Account Binding needs both --eab-kid and --eab-hmac")
        assert client.net.key is not None
        eab = messages.ExternalAccountBinding.from_data(
            account_public_key=client.net.key.public_key(), kid=eab_kid, hmac_key=eab_hmac,
            directory=client.directory)
    elif client.external_account_required():
        raise AcmeFailure("this CA requires External Account Binding: pass --eab-kid and "
                          "--eab-hmac from the CA's dashboard")
    registration = messages.NewRegistration.from_data(
        email=email or None, terms_of_service_agreed=True, external_account_binding=eab)
    with _translated(client.net):
        regr = client.new_account(registration)
    return Registered(key_pem, regr.uri)


def issue(client: acme_client.ClientV2, hostname: str, key_type: str, publish: Publish, *,
          challenge: str = "http-01", timeout: float = 90.0, replaces: str = "") -> Issued:
    """Order a certificate for ``hostname`` and see it through. ``replaces``: the ARI
    certificate id (:func:`ari_certificate_id`) of the certificate this one renews, sent to a
    CA that offers ARI (RFC 9773 §5). Raises AcmeFailure."""
    key_pem = new_private_key(key_type)
    csr = crypto_util.make_csr(key_pem, [hostname])
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    with _translated(client.net):
        order = (_new_order_replacing(client, csr, replaces)
                 if replaces and offers_ari(client) else client.new_order(csr))
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # the CA reused an authorization validated earlier
            body = _pick_challenge(authz, challenge)
            chall = body.chall
            assert isinstance(chall, challenges.KeyAuthorizationChallenge)
            response, validation = chall.response_and_validation(client.net.key)
            token = (chall.encode("token") if isinstance(chall, challenges.HTTP01)
                     else "tls-alpn-01:" + hostname)
            publish(token, hostname, str(validation))
            client.answer_challenge(body, response)
        order = _poll_authorizations(client, order, deadline)
        order = _finalize(client, order, deadline)
    chain = order.fullchain_pem.encode("ascii")
    leaf = x509.load_pem_x509_certificate(chain)
    return Issued(chain, key_pem, leaf.not_valid_before_utc.timestamp(),
                  leaf.not_valid_after_utc.timestamp(), renewal_advice(client, chain))


def offers_ari(client: acme_client.ClientV2) -> bool:
    return "renewalInfo" in client.directory.to_partial_json()


def renewal_advice(client: acme_client.ClientV2, chain_pem: bytes) -> RenewalAdvice:
    """The CA's ARI for a certificate; advice only, so a failure to get it is "no advice,
    ask again in an hour" (the 2/3 rule stands meanwhile)."""
    if not offers_ari(client):
        return RenewalAdvice(None, None)
    try:
        suggested, check = client.renewal_time(chain_pem)
    except (errors.Error, requests.RequestException, ValueError, JoseError):
        return RenewalAdvice(None, time.time() + 3600)
    # acme returns naive local datetimes for the next check, aware ones for the window.
    return RenewalAdvice(None if suggested is None else suggested.timestamp(),
                         check.timestamp())


def ari_certificate_id(chain_pem: bytes) -> str:
    """RFC 9773 §4.1: base64url(authority key identifier) "." base64url(serial number)."""
    leaf = x509.load_pem_x509_certificate(chain_pem)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    serial = leaf.serial_number
    serial_der = serial.to_bytes(serial.bit_length() // 8 + 1, "big")  # DER: room for a sign bit
    return f"{_b64url(aki.key_identifier or b'')}.{_b64url(serial_der)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


class _NewOrderReplacing(messages.NewOrder):
    """``acme`` 5's NewOrder has no ``replaces`` (RFC 9773 §5)."""

    replaces: str = jose.field("replaces", omitempty=True)


def _new_order_replacing(client: acme_client.ClientV2, csr_pem: bytes,
                         replaces: str) -> messages.OrderResource:
    """``ClientV2.new_order`` with ``replaces``, on public ``acme`` API only."""
    csr = x509.load_pem_x509_csr(csr_pem)
    dns_names, _ = crypto_util.get_identifiers_from_x509(csr.subject, csr.extensions)
    identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=name)
                   for name in dns_names]
    request = _NewOrderReplacing(identifiers=identifiers, replaces=replaces)
    response = client.net.post(client.directory["newOrder"], request,
                               new_nonce_url=client.directory["newNonce"])
    body = messages.Order.from_json(response.json())
    authorizations = [client.poll(messages.AuthorizationResource(
        uri=url, body=messages.Authorization()))[0] for url in body.authorizations]
    return messages.OrderResource(body=body, uri=response.headers.get("Location"),
                                  authorizations=authorizations, csr_pem=csr_pem)


POLL_FIRST = 0.25
"""Seconds before the first look at a pending authorization when the CA gives no
``Retry-After``; doubled up to :data:`POLL_MAX` (``acme``'s own loop waits 1 s every time
and ignores ``Retry-After``)."""
POLL_MAX = 2.0


def _poll_authorizations(client: acme_client.ClientV2, order: messages.OrderResource,
                         deadline: datetime.datetime) -> messages.OrderResource:
    """Wait until no authorization is pending, as often as the CA's ``Retry-After`` allows
    (RFC 8555 §7.5.1). Raises ``acme``'s ValidationError / TimeoutError like its own loop."""
    done = []
    for authz in order.authorizations:
        wait = POLL_FIRST
        while authz.body.status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise errors.TimeoutError()
            authz, response = client.poll(authz)
            if authz.body.status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING):
                time.sleep(min(left, retry_after_seconds(response) or wait))
                wait = min(POLL_MAX, wait * 2)
        done.append(authz)
    failed = [a for a in done if a.body.status != messages.STATUS_VALID]
    if failed:
        raise errors.ValidationError(failed)
    updated: messages.OrderResource = order.update(authorizations=done)
    return updated


def _finalize(client: acme_client.ClientV2, order: messages.OrderResource,
              deadline: datetime.datetime) -> messages.OrderResource:
    """Finalize and fetch the certificate, polling like :func:`_poll_authorizations`
    (``acme``'s ``finalize_order`` sleeps a whole second before its first look)."""
    _begin_finalization(client, order)
    wait = POLL_FIRST
    while True:
        response = _post_as_get(client, order.uri)
        body = messages.Order.from_json(response.json())
        if body.status == messages.STATUS_READY:  # it was not yet when we asked
            _begin_finalization(client, order)
        elif body.status == messages.STATUS_VALID and body.certificate is not None:
            chain = _post_as_get(client, body.certificate).text
            done: messages.OrderResource = order.update(body=body, fullchain_pem=chain)
            return done
        if body.status == messages.STATUS_INVALID:
            raise errors.IssuanceError(body.error) if body.error is not None else \
                errors.Error("the CA abandoned the order without saying why")
        left = (deadline - datetime.datetime.now()).total_seconds()
        if left <= 0:
            raise errors.TimeoutError()
        time.sleep(min(left, retry_after_seconds(response) or wait))
        wait = min(POLL_MAX, wait * 2)


def _begin_finalization(client: acme_client.ClientV2, order: messages.OrderResource) -> None:
    try:
        client.begin_finalization(order)
    except messages.Error as exc:
        if exc.code != "orderNotReady":
            raise


def _post_as_get(client: acme_client.ClientV2, url: str) -> requests.Response:
    return client.net.post(url, None, new_nonce_url=client.directory["newNonce"])


def revoke(client: acme_client.ClientV2, chain_pem: bytes, reason: int = 0) -> None:
    """Revoke the leaf of ``chain_pem`` (signed with the account key). Raises AcmeFailure."""
    with _translated(client.net):
        client.revoke(x509.load_pem_x509_certificate(chain_pem), reason)


def _pick_challenge(authz: messages.AuthorizationResource, wanted: str) -> messages.ChallengeBody:
    kinds: dict[str, type[challenges.Challenge]] = {"http-01": challenges.HTTP01,
                                                    "tls-alpn-01": TLSALPN01}
    order = [wanted, *(k for k in kinds if k != wanted)]
    for kind in order:
        for body in authz.body.challenges:
            if isinstance(body.chall, kinds[kind]):
                return body
    offered = ", ".join(b.chall.typ for b in authz.body.challenges)
    raise AcmeFailure(f"the CA offers no challenge the edge answers (offered: {offered})",
                      kind="rejected")


RATE_LIMIT_DEFAULT_WAIT = 3600.0
"""Seconds to leave an account alone after ``rateLimited`` without a ``Retry-After``."""


class _translated:
    """Turn acme/requests exceptions into AcmeFailure with the CA's text and, when the CA
    refused with 429/503, its ``Retry-After``."""

    def __init__(self, net: acme_client.ClientNetwork) -> None:
        self.net = net

    def __enter__(self) -> None:
        if isinstance(self.net, _Network):
            self.net.refused_status = 0
            self.net.refused_retry_after = 0.0

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        if exc is None or isinstance(exc, AcmeFailure):
            return
        refused = self.net if isinstance(self.net, _Network) and self.net.refused_status else None
        failure = _failure(exc)
        if refused is not None:
            # 429 or 503: the CA as a whole is refusing us for a while, whatever the body said.
            failure.account_wide = True
            failure.kind = "rate_limited" if refused.refused_status == 429 else "unreachable"
            if refused.refused_retry_after:
                failure.retry_after = refused.refused_retry_after
                failure.args = (f"{failure} (the CA asks to retry after "
                                f"{failure.retry_after:.0f} s)",)
        raise failure from exc


def _failure(exc: BaseException) -> AcmeFailure:
    if isinstance(exc, requests.RequestException):
        return AcmeFailure(f"CA unreachable: {type(exc).__name__}: {exc}"[:500],
                           account_wide=True, kind="unreachable")
    if isinstance(exc, messages.Error):
        text = f"{exc.typ}: {exc.detail}" if exc.detail else str(exc)
        if exc.code == "rateLimited":
            return AcmeFailure(text, account_wide=True, kind="rate_limited",
                               retry_after=RATE_LIMIT_DEFAULT_WAIT)
        if exc.code in ("unauthorized", "rejectedIdentifier", "caa", "dns", "connection",
                        "incorrectResponse", "tls"):
            return AcmeFailure(text, kind="validation")
        if exc.code in ("accountDoesNotExist", "externalAccountRequired", "badNonce",
                        "serverInternal"):
            return AcmeFailure(text, account_wide=True, kind="rejected")
        return AcmeFailure(text, kind="rejected")
    if isinstance(exc, errors.ValidationError):
        texts = []
        for authz in exc.failed_authzrs:
            for body in authz.body.challenges:
                if body.error is not None:
                    texts.append(f"{authz.body.identifier.value}: {body.error.typ}: "
                                 f"{body.error.detail}")
        return AcmeFailure("; ".join(texts) or "validation failed", kind="validation")
    if isinstance(exc, errors.TimeoutError):
        return AcmeFailure("the order did not complete in time", kind="timeout")
    if isinstance(exc, errors.Error):
        return AcmeFailure(f"{type(exc).__name__}: {exc}", kind="rejected")
    return AcmeFailure(f"{type(exc).__name__}: {exc}", kind="rejected")
