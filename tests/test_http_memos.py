"""The per-site memos of the HTTP engine (filter outcomes, cache decisions, IP-rule verdicts)
stay bounded whatever a client sends: long keys are never remembered, and all sites' memos
together are forgotten once MEMO_ENTRIES_MAX entries were added, so a scan with many distinct
URLs over many sites cannot grow them without limit. Answers stay right throughout."""

from __future__ import annotations

import re

import pytest

from edge.directory.service import DirectoryService
from httpproxy import server
from tests.test_http_support import running

FILTERS = {"ip_deny": ["192.0.2.0/24"], "path_deny": [{"prefix": "/wp-admin"}],
           "user_agent_deny": ["(?i)badbot"]}
CACHE = {"mode": "full", "ttl": {"200": 600, "404": 60}}


def _pipelined(paths: list[str], host: str = "www.a.test") -> bytes:
    requests = [f"GET {p} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: curl\r\n\r\n" for p in paths]
    requests[-1] = requests[-1][:-2] + "Connection: close\r\n\r\n"
    return "".join(requests).encode()


def _memo_keys(edge_engine: server.HttpEngine) -> list[bytes]:
    states = set(edge_engine._sites.values()) | {r.state for r in edge_engine.routes.values()}
    targets = [key[2] for state in states for key in state.filter_memo]
    targets += [key[1] for state in states for key in state.cache_memo]
    return targets


async def test_memos_skip_long_keys_and_are_forgotten_at_the_budget(
        service: DirectoryService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "MEMO_ENTRIES_MAX", 40)
    async with running(service.store, service) as (edge, (backend,)):
        await service.update_site("www.a.test", filters=FILTERS, cache_policy=CACHE)
        await edge.sync()
        engine = edge.engine
        long_path = "/long/" + "x" * 2000
        paths = [f"/page/{i}" for i in range(60)] + [long_path, "/wp-admin/x", "/page/0"]
        answer = await edge.raw(_pipelined(paths))
        # Every request answered, in order, and the filters still decide after the resets.
        statuses = re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", answer)
        assert statuses == [b"200"] * 61 + [b"403", b"200"]
        assert engine.memo_resets >= 2  # 60 distinct pages add ~120 entries against 40
        remembered = _memo_keys(engine)
        assert 0 < len(remembered) <= 40
        assert all(len(target) <= 1024 for target in remembered)  # the long URL never was
        # The memo only ever skips work: a page fetched before a reset is still a cache HIT.
        again = await edge.raw(_pipelined(["/page/1"]))
        assert b"X-Cache: HIT" in again
        assert backend.counter == 61  # each distinct page fetched once; /page/0 and /page/1 hit
