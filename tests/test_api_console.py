"""The web console in a real headless browser (Debian's /usr/bin/chromium driven by
playwright; no browser download): sign in, fleet overview, a tenant's page, a move followed
live to the end; and a cross-origin page in the same browser cannot make it write.

``EDGE_UPDATE_SCREENSHOTS=1`` writes the screenshots to docs/console-*.png (referenced from
docs/operations.md); otherwise they go to the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import expect

from edge.api.fleetmetrics import summarise
from edge.directory.service import DirectoryService
from tests.support_api import Api, api

__all__ = ["api"]

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None and not os.environ.get("CI"),
                                reason="Debian chromium is not installed")


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """The browser tests run on SQLite only (the API tests cover both stores)."""
    return sqlite_url


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    return DOCS if os.environ.get("EDGE_UPDATE_SCREENSHOTS") == "1" else tmp_path


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        await chromium.close()


async def seed(service: DirectoryService) -> None:
    await service.add_host("web1", "10.0.0.11")
    await service.add_host("web2", "10.0.0.12")
    await service.add_host("web3", "10.0.0.13", state="maintenance", notice="disk swap")
    for tenant, host in (("acme", "web1"), ("globex", "web1"), ("initech", "web2")):
        await service.add_tenant(tenant, host)
    await service.add_site("www.acme.example", "acme", https_redirect=True)
    await service.add_site("shop.acme.example", "acme")
    await service.add_account("acme", "acme")
    await service.add_account("acme-deploy", "acme", protocols=["ssh"],
                              upstream_username="deploy")


async def wait_for_progress(page: object, selector: str, above: float) -> None:
    """Poll a progress bar (the page's CSP forbids the eval wait_for_function needs)."""
    for _ in range(100):
        if await page.eval_on_selector(selector, "e => e.value") > above:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"progress never passed {above}")


async def sign_in(page: object, base: str, token: str) -> None:
    await page.goto(base + "/console/")  # type: ignore[attr-defined]
    assert page.url.endswith("/console/login")  # type: ignore[attr-defined]
    await page.fill("input[name=token]", token)  # type: ignore[attr-defined]
    await page.click("main button")  # type: ignore[attr-defined]
    await page.wait_for_url(base + "/console/")  # type: ignore[attr-defined]


async def test_console_overview_tenant_and_a_live_move(api: Api, browser: object,
                                                       shots: Path) -> None:
    await seed(DirectoryService(api.store))
    context = await browser.new_context(viewport={"width": 1200, "height": 900})  # type: ignore[attr-defined]
    page = await context.new_page()
    await page.goto(api.base + "/console/login")
    await page.fill("input[name=token]", "edge_wrong")
    async with page.expect_navigation():
        await page.click("main button")
    assert "unknown token" in await page.inner_text("main")
    await sign_in(page, api.base, api.writer)

    hosts = await page.inner_text("table >> nth=0")
    assert "web1\t10.0.0.11\tactive\t2\t-" in hosts
    assert "web3\t10.0.0.13\tmaintenance\t0\t-" in hosts
    assert "disk swap" in hosts
    await page.screenshot(path=str(shots / "console-fleet.png"), full_page=True)

    await page.click("a:text-is('acme')")
    await page.wait_for_url(api.base + "/console/tenants/acme")
    main = await page.inner_text("main")
    assert "www.acme.example\tweb1 10.0.0.11:80\tweb1 10.0.0.11:443" in main
    assert "acme-deploy\tssh\tdeploy\tweb1 10.0.0.11:22" in main
    assert "account\tacme-deploy" in main  # recent changes
    await page.screenshot(path=str(shots / "console-tenant.png"), full_page=True)

    await page.select_option("select[name=to]", "web2")
    await page.fill("input[name=drain]", "3")
    await page.click("#move")
    await page.wait_for_url("**/console/operations/*")
    assert await page.inner_text("#phase") == "draining"
    await wait_for_progress(page, "#drained", 0.2)
    await page.screenshot(path=str(shots / "console-move.png"), full_page=True)
    tenant = await api.store.fetch_tenant("acme")
    assert tenant is not None and (tenant.host, tenant.previous_host) == ("web2", "web1")
    # The page follows the operation's stream to the end without a reload.
    await expect(page.locator("#phase")).to_have_text("finished", timeout=15000)
    assert await page.eval_on_selector("#drained", "e => e.value") == 1

    # A host drain from the fleet page, followed live the same way.
    await page.goto(api.base + "/console/")
    await page.select_option("select[name=host]", "web1")
    await page.select_option("select[name=to]", "web2")
    await page.fill("form[action='/console/drain'] input[name=drain]", "2")
    await page.click("#drain")
    await page.wait_for_url("**/console/operations/*")
    await expect(page.locator("#steps")).to_have_text("1/1", timeout=15000)
    await expect(page.locator("#step-1")).to_have_text("done")  # the table follows too
    assert "globex" in await page.inner_text("main")
    await page.screenshot(path=str(shots / "console-drain.png"), full_page=True)
    await expect(page.locator("#phase")).to_have_text("finished", timeout=15000)
    assert {t.host for t in await api.store.list_tenants()} == {"web2"}
    await context.close()


async def test_read_only_token_sees_no_move_form(api: Api, browser: object) -> None:
    await seed(DirectoryService(api.store))
    page = await browser.new_page()  # type: ignore[attr-defined]
    await sign_in(page, api.base, api.reader)
    await page.goto(api.base + "/console/tenants/acme")
    assert await page.locator("#move").count() == 0
    assert "signed in as viewer (read)" in await page.inner_text("header")


async def test_a_page_of_another_origin_cannot_make_the_console_write(api: Api,
                                                                      browser: object) -> None:
    """Signed in, the browser visits another origin whose page auto-submits a move form to
    the console: the browser sends the cookie (same site: 127.0.0.1) but its Origin gives it
    away, so nothing moves."""
    await seed(DirectoryService(api.store))
    evil_page = f"""<form id=f method=post action="{api.base}/console/tenants/acme/move">
<input name=to value=web2><input name=drain value=0></form>
<script>document.getElementById('f').submit()</script>"""

    async def evil(request: web.Request) -> web.Response:
        return web.Response(text=evil_page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", evil)
    attacker = TestServer(app, host="127.0.0.1")
    await attacker.start_server()
    try:
        page = await browser.new_page()  # type: ignore[attr-defined]
        await sign_in(page, api.base, api.writer)
        async with page.expect_navigation(url=f"{api.base}/console/tenants/acme/move"):
            await page.goto(str(attacker.make_url("/")))
        assert "cross-origin form posts are refused" in await page.content()
    finally:
        await attacker.close()
    tenant = await api.store.fetch_tenant("acme")
    assert tenant is not None and tenant.host == "web1"
    # Same origin but without the form token (a forged request from a script elsewhere that
    # sets Origin): refused as well.
    forged = await api.call("POST", "/console/tenants/acme/move", token=None,
                            data=b"to=web2&drain=0", headers={
                                "Cookie": f"edge_console={api.writer}", "Origin": api.base,
                                "Content-Type": "application/x-www-form-urlencoded"})
    assert forged.status == 403 and "form token" in forged.body
    assert (await api.store.fetch_tenant("acme")).host == "web1"  # type: ignore[union-attr]


def test_console_metrics_summary_reads_the_edges_metric_names() -> None:
    """The console's live numbers come from the real metric objects' exposition."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    registry = CollectorRegistry()
    requests = Counter("edge_http_requests", "", ["status_class"], registry=registry)
    logins = Counter("edge_ssh_logins", "", ["method", "outcome"], registry=registry)
    sessions = Gauge("edge_active_sessions", "", ["proxy"], registry=registry)
    requests.labels(status_class="2xx").inc(98)
    requests.labels(status_class="5xx").inc(2)
    logins.labels(method="password", outcome="failure").inc(5)  # users' wrong passwords
    logins.labels(method="password", outcome="unavailable").inc(1)
    logins.labels(method="publickey", outcome="success").inc(4)
    sessions.labels(proxy="ssh").set(7)
    summary = summarise(generate_latest(registry).decode())
    assert summary.ratio_text(summary.http_5xx, summary.http_requests) == "2.0%"
    assert summary.ratio_text(summary.ssh_edge_failures, summary.ssh_logins) == "10.0%"
    assert summary.active_sessions == {"ssh": 7}
    import edge.metrics
    import httpproxy.metrics
    import sshproxy.metrics

    # The names above are the ones the proxies export (no drift between the two).
    assert httpproxy.metrics.REQUESTS._name == "edge_http_requests"
    assert sshproxy.metrics.LOGINS._name == "edge_ssh_logins"
    assert edge.metrics.ACTIVE_SESSIONS._name == "edge_active_sessions"
