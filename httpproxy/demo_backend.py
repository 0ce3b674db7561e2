"""A tiny web server for ``edge demo`` and manual testing: says which backend answered.

``python -m httpproxy.demo_backend PORT NAME`` serves on 127.0.0.1:PORT:

* ``/`` and any other path: a short text page naming the backend, the Host asked for and the
  X-Forwarded-For the proxy set;
* ``/style.css``: a static-looking file (cached by the demo site's ``static`` cache policy:
  the second request shows ``X-Cache: HIT``);
* ``/headers``: the request headers as JSON.
"""

from __future__ import annotations

import argparse
import time

from aiohttp import web


def make_app(name: str) -> web.Application:
    async def page(request: web.Request) -> web.Response:
        text = (f"Hello from backend {name}\n"
                f"host asked for: {request.headers.get('Host', '')}\n"
                f"path: {request.path_qs}\n"
                f"client (X-Forwarded-For): {request.headers.get('X-Forwarded-For', '-')}\n"
                f"scheme (X-Forwarded-Proto): {request.headers.get('X-Forwarded-Proto', '-')}\n")
        return web.Response(text=text)

    async def style(request: web.Request) -> web.Response:
        return web.Response(text=f"/* served by {name} at {time.strftime('%H:%M:%S')} */\n"
                                 "body { font-family: sans-serif; }\n", content_type="text/css")

    async def headers(request: web.Request) -> web.Response:
        return web.json_response({"backend": name, "headers": dict(request.headers)})

    app = web.Application()
    app.router.add_get("/style.css", style)
    app.router.add_get("/headers", headers)
    app.router.add_route("*", "/{tail:.*}", page)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("name")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    web.run_app(make_app(args.name), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
