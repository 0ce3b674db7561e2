"""Headers a client could use to poison a shared cache through the backend's framework: the
X-Forwarded family is the edge's to state, so the client's look-alikes never reach a backend."""

from __future__ import annotations

from tests.test_http_cache_rfc import Rig, rig  # noqa: F401

SPOOFED = ("X-Forwarded-Port: 1", "X-Forwarded-Ssl: on", "X-Forwarded-Scheme: https",
           "X-Forwarded-Prefix: /evil", "Front-End-Https: on", "X-Url-Scheme: https")


async def test_client_forwarding_lookalikes_never_reach_the_backend(rig: Rig) -> None:  # noqa: F811
    # Rack takes the scheme from X-Forwarded-Ssl before X-Forwarded-Proto; Symfony, Laravel
    # and Rails build absolute URLs from X-Forwarded-Port/-Prefix. None is part of the cache
    # key, so a page rendered from them would be served from the cache to every visitor.
    rig.origin.set("/page", ("Cache-Control", "public, max-age=3600"))
    answer = await rig.get("/page", *SPOOFED, "X-Custom: kept")
    assert answer.status == 200
    seen = rig.origin.requests[-1]
    assert seen["x-forwarded-proto"] == "http" and seen["x-custom"] == "kept"
    leaked = {name: seen[name] for name in
              (line.split(":", 1)[0].lower() for line in SPOOFED) if name in seen}
    assert leaked == {}
