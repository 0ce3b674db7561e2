"""Per-site filters applied by the running HTTP edge (the rules themselves are unit-tested
exhaustively in test_http_rules.py): each refusal reaches the client with the right status and
headers, and a refused request never reaches the backend."""

from __future__ import annotations

import base64
import hashlib

from edge.directory.service import DirectoryService
from edge.proxyproto import encode_v2
from tests.test_http_support import http_config, running, statuses


async def _filters(edge, service: DirectoryService, **rules: object) -> None:  # type: ignore[no-untyped-def]
    await service.update_site("www.a.test", filters=rules)
    await edge.sync()


async def test_ip_deny_and_allow(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await _filters(edge, service, ip_deny=["127.0.0.0/8"])
        r = await edge.curl()
        assert r.status == 403
        await _filters(edge, service, ip_allow=["10.0.0.0/8"])
        assert (await edge.curl()).status == 403
        await _filters(edge, service, ip_allow=["127.0.0.1/32"])
        assert (await edge.curl()).status == 200
        assert len(a.requests) == 1


async def test_path_methods_user_agent(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await _filters(edge, service, path_deny=[{"prefix": "/.git"}, {"regex": r"\.bak$"}],
                       methods=["GET"], user_agent_deny=["(?i)badbot"])
        assert (await edge.curl(path="/.git/config")).status == 403
        assert (await edge.curl(path="/%2egit/config")).status == 403  # decoded before matching
        assert (await edge.curl(path="/x/../.git/HEAD")).status == 403
        assert (await edge.curl(path="/db.bak")).status == 403
        r = await edge.curl("-X", "POST", path="/ok")
        assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
        assert (await edge.curl("-A", "BadBot/1.0", path="/ok")).status == 403
        assert a.requests == []
        assert (await edge.curl("-I", path="/ok")).status == 200  # HEAD implied by GET
        assert (await edge.curl(path="/ok")).status == 200


async def test_rate_limit_429_with_retry_after(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await _filters(edge, service, rate_limit={"requests_per_second": 0.01, "burst": 3})
        got = [(await edge.curl(path=f"/r{i}")).status for i in range(5)]
        assert got == [200, 200, 200, 429, 429]
        r = await edge.curl(path="/r")
        assert r.status == 429 and int(r.headers["retry-after"]) >= 1
        assert len(a.requests) == 3


async def test_basic_auth(service: DirectoryService) -> None:
    digest = hashlib.sha256(b"s3cret").hexdigest()
    async with running(service.store, service) as (edge, (a,)):
        await _filters(edge, service, basic_auth=[{"prefix": "/admin", "realm": "staff",
                                                   "users": {"ann": digest}}])
        r = await edge.curl(path="/admin/x")
        assert r.status == 401
        assert r.headers["www-authenticate"].startswith('Basic realm="staff"')
        assert (await edge.curl("-u", "ann:wrong", path="/admin/x")).status == 401
        assert a.requests == []
        r = await edge.curl("-u", "ann:s3cret", path="/admin/x")
        assert r.status == 200
        assert r.json()["headers"]["Authorization"] == "Basic " + base64.b64encode(b"ann:s3cret").decode()
        assert (await edge.curl(path="/public")).status == 200


async def test_https_redirect_and_no_hsts_on_http(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await service.update_site("www.a.test", https_redirect=True, hsts=True)
        await edge.sync()
        r = await edge.curl(path="/p?q=1", host="www.a.test:8080")
        assert r.status == 301
        assert r.headers["location"] == "https://www.a.test/p?q=1"
        assert "strict-transport-security" not in r.headers
        r = await edge.curl("-X", "POST", "-d", "x", path="/form")
        assert r.status == 308
        assert a.requests == []


async def test_maintenance_filter_503(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await _filters(edge, service, maintenance=True)
        r = await edge.curl()
        assert r.status == 503 and r.headers["retry-after"].isdigit()
        assert a.requests == []


async def test_rules_change_applies_on_next_request(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        await _filters(edge, service, path_deny=[{"prefix": "/x"}])
        assert (await edge.curl(path="/x")).status == 403
        await _filters(edge, service)
        assert (await edge.curl(path="/x")).status == 200


async def test_remembered_filter_outcomes_never_cross_requests(service: DirectoryService) -> None:
    """The proxy remembers the filters' outcome per request shape (not per client): another
    client address, User-Agent, method or path on the same site gets its own answer, the
    first time and when the outcomes are remembered."""
    async with running(service.store, service,
                       http=http_config(trusted_proxies=("127.0.0.0/8",))) as (edge, (a,)):
        await _filters(edge, service, ip_deny=["10.0.0.0/8"], path_deny=[{"prefix": "/.git"}],
                       methods=["GET"], user_agent_deny=["(?i)badbot"])

        async def status(client: str, ua: str = "curl/8", path: str = "/ok",
                         method: str = "GET") -> int:
            header = encode_v2((client, 40000), ("127.0.0.1", edge.port))
            raw = await edge.raw(header + (f"{method} {path} HTTP/1.1\r\nHost: www.a.test\r\n"
                                           f"User-Agent: {ua}\r\nConnection: close\r\n\r\n").encode())
            (got,) = statuses(raw)
            return got

        for _ in range(2):  # the second round is answered from what was remembered
            assert await status("192.0.2.1") == 200
            assert await status("10.1.2.3") == 403  # the same request from a denied network
            assert await status("192.0.2.2", ua="BadBot/2") == 403
            assert await status("192.0.2.1", path="/.git/config") == 403
            assert await status("192.0.2.1", method="DELETE") == 405
            assert await status("192.0.2.9") == 200
        assert len(a.requests) == 4


async def test_https_redirect_of_wildcard_site_keeps_each_host(service: DirectoryService) -> None:
    """A wildcard site redirects each name to itself, also once the outcome is remembered."""
    async with running(service.store, service) as (edge, (a,)):
        await service.update_site("*.a.test", https_redirect=True)
        await edge.sync()
        for _ in range(2):
            for name in ("x.a.test", "y.a.test"):
                r = await edge.curl(path="/p", host=name)
                assert r.status == 301 and r.headers["location"] == f"https://{name}/p"
        assert a.requests == []



# A denied non-ASCII path spelt percent-encoded (either case, double), with dot segments,
# doubled slashes, a query; and spelt with raw UTF-8 bytes, alone or mixed with escapes.
NON_ASCII_ENCODED = [
    b"/admin-%C3%A9", b"/admin-%c3%a9", b"/admin-%C3%a9x", b"/admin-%25c3%25a9",
    b"/%C3%A4/x", b"/%c3%a4/", b"/x/../%C3%A4/.", b"//%c3%a4//x?y", b"/%25C3%25A4/",
]
NON_ASCII_RAW = [
    b"/admin-\xc3\xa9", b"/admin-\xc3%a9", b"/admin-%C3\xa9/x", b"/\xc3\xa4/", b"/%c3\xa4//x",
    b"/x/../\xc3\xa4/.",
]


async def test_non_ascii_path_deny_holds_for_every_spelling(service: DirectoryService) -> None:
    """A path_deny prefix with a non-ASCII character refuses the path however the client
    spells its bytes, twice (the second answer is the remembered one): percent-encoded
    spellings get 403; raw bytes above 0x7F are not allowed in a request-target (RFC 9112
    §3.2; llhttp's strict mode) and get 400. Nothing reaches the backend. An invalid UTF-8
    sequence (%E9, Latin-1 é) is another path, as in nginx, and is forwarded."""
    async with running(service.store, service) as (edge, (a,)):
        await _filters(edge, service, path_deny=[{"prefix": "/admin-é"}, {"prefix": "/ä/"}])

        async def status(target: bytes) -> int:
            raw = await edge.raw(b"GET " + target + b" HTTP/1.1\r\nHost: www.a.test\r\n"
                                 b"Connection: close\r\n\r\n")
            (got,) = statuses(raw)
            return got

        for _ in range(2):
            got = {target: await status(target) for target in NON_ASCII_ENCODED}
            assert got == dict.fromkeys(NON_ASCII_ENCODED, 403)
            got = {target: await status(target) for target in NON_ASCII_RAW}
            assert got == dict.fromkeys(NON_ASCII_RAW, 400)
        assert (await edge.curl(path="/admin-%C3%A9")).status == 403
        assert a.requests == []
        assert await status(b"/admin-%E9") == 200
        assert await status(b"/%C3%A4") == 200  # not under "/ä/"
        assert len(a.requests) == 2
