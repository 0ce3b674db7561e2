"""The HTTP/HTTPS part of ``edge demo``: two local web backends and the curl commands to try.

Backends (``python -m httpproxy.demo_backend PORT NAME``) listen on the demo hosts' HTTP ports
(8081 for demo-a, 8082 for demo-b) and answer with their name, so ``edge tenant move demo --to
demo-b`` visibly moves ``www.demo.test``. The edge listens for HTTP on 127.0.0.1:8000 and for
HTTPS on 127.0.0.1:8400 (the TLS listener uses the sites' self-signed demo certificate).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edge.demo import DemoPart

HTTP_PORT = 8000
HTTPS_PORT = 8400
BACKENDS = (("demo-a", 8081), ("demo-b", 8082))


def demo_part(demo_dir: Path) -> DemoPart:
    """Start the two backends; the ``[http]``/``[https]`` sections and the banner lines."""
    log_dir = demo_dir / "http"
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = [
        subprocess.Popen([sys.executable, "-m", "httpproxy.demo_backend", str(port), name],
                         stdout=subprocess.DEVNULL)
        for name, port in BACKENDS]
    config = (f'[http]\nlisten = ["127.0.0.1:{HTTP_PORT}"]\n'
              f'access_log = "{log_dir / "access.log"}"\n\n'
              f'[https]\nlisten = ["127.0.0.1:{HTTPS_PORT}"]\n')
    http = f"http://127.0.0.1:{HTTP_PORT}"
    resolve = f"--resolve www.demo.test:{HTTPS_PORT}:127.0.0.1 -k"
    commands = (
        f"  http:    curl -H 'Host: www.demo.test' {http}/            (backend {{demo_host}})\n"
        f"           curl -H 'Host: www.other.test' {http}/           (backend {{other_host}})\n"
        f"           curl -H 'Host: shop.demo.test' {http}/           (wildcard *.demo.test)\n"
        f"           curl -i -H 'Host: www.demo.test' {http}/style.css  (twice: X-Cache MISS, HIT)\n"
        f"           curl -i -H 'Host: nothing.test' {http}/          (404: unknown site)\n"
        f"  https:   curl {resolve} https://www.demo.test:{HTTPS_PORT}/\n"
        f"  access log: {log_dir / 'access.log'}\n")
    return DemoPart(config=config, commands=commands, processes=processes)
