"""The HTTP availability SLI: 5xx the edge answers itself are counted apart from a backend's
own 5xx (config/prometheus/edge-slo.yml divides the first by all requests)."""

from __future__ import annotations

from edge.directory.service import DirectoryService
from tests.test_http_support import running


async def test_edge_errors_count_the_edges_own_5xx_and_not_the_backends(
        service: DirectoryService) -> None:
    async with running(service.store, service, backends=2) as (edge, (_a, b)):
        stats = edge.engine.stats
        for _ in range(3):  # the site's application fails: its 500s are not the edge's
            assert (await edge.curl(host="www.a.test", path="/status/500")).status == 500
            assert (await edge.curl(host="www.a.test", path="/status/503")).status == 503
        assert stats.edge_errors == {}
        await b.stop()  # the backend host unreachable: the edge answers 502 itself
        assert (await edge.curl(host="www.b.test")).status == 502
        await service.set_host_state("host-a", "maintenance", "disks")
        await edge.feed.poll_once()
        assert (await edge.curl(host="www.a.test")).status == 503
        assert stats.edge_errors == {502: 1, 503: 1}
        assert stats.status[5] == 8  # every 5xx is still a 5xx in edge_http_requests_total
