"""The ACME part of ``edge demo``: when Debian's ``pebble`` is installed, a local CA issues
``secure.demo.test`` its certificate through the demo edge's own HTTP listener (HTTP-01)
within seconds of the start; without pebble the banner says how to see it."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from edge.acme import client
from edge.acme.pebble import Pebble, available
from edge.demo import DemoPart, edge_command
from edge.directory.service import DirectoryService
from edge.errors import ConflictError, NotFoundError

SITE = "secure.demo.test"
HTTP_PORT = 8000  # httpproxy.demo's listeners: pebble validates against them
HTTPS_PORT = 8400


def demo_part(demo_dir: Path) -> DemoPart:
    if not available():
        return DemoPart(config="", commands="  acme:    (install Debian's pebble to watch "
                        f"{SITE} get a certificate from a local CA)\n")
    pebble = Pebble(demo_dir / "pebble", http_port=HTTP_PORT, tls_port=HTTPS_PORT)
    root = demo_dir / "pebble-root.pem"
    root.write_bytes(pebble.root_pem())

    async def provision(service: DirectoryService) -> None:
        # A new pebble knows no account from an earlier demo run: register again.
        with contextlib.suppress(NotFoundError):
            await service.remove_acme_account("demo-pebble")
        registered = await asyncio.to_thread(client.register, pebble.directory,
                                             ca_file=str(pebble.ca_file))
        await service.add_acme_account("demo-pebble", pebble.directory, registered.key_pem,
                                       account_url=registered.account_url)
        with contextlib.suppress(ConflictError):
            await service.add_site(SITE, "demo")
        await service.enable_auto_cert(SITE)
        await service.request_acme_renewal(SITE)  # issued by this run's CA

    config = (f'[acme]\nenabled = true\nca_file = "{pebble.ca_file}"\npoll_interval = 1.0\n'
              'backoff_base = 5.0\n')
    commands = (
        f"  acme:    {SITE} gets its certificate from a local pebble CA within seconds:\n"
        f"           {edge_command()} --config {demo_dir / 'edge.toml'} cert status\n"
        f"           curl --cacert {root} --resolve {SITE}:{HTTPS_PORT}:127.0.0.1 "
        f"https://{SITE}:{HTTPS_PORT}/\n")
    return DemoPart(config=config, commands=commands, processes=[pebble.proc, pebble.dns],
                    provision=provision)
