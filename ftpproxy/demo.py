"""The FTP part of ``edge demo``: two local pyftpdlib backends and the commands to try.

The backends (``python -m ftpproxy.devserver``) listen on the demo hosts' FTP ports (2101 for
demo-a, 2102 for demo-b) with user ``demo`` / password ``demo`` and a home directory under
``<demo dir>/ftp/<host>`` holding ``hello.txt`` that names the backend, so
``edge tenant move demo --to demo-b`` visibly moves the next login. The proxy answers on
127.0.0.1:2121 with explicit FTPS (a self-signed certificate written to the demo directory).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from edge.demo import DemoPart, self_signed

PROXY_PORT = 2121
PASSIVE_PORTS = (21000, 21099)
BACKENDS = (("demo-a", 2101), ("demo-b", 2102))
USER, PASSWORD = "demo", "demo"


def demo_part(demo_dir: Path) -> DemoPart:
    """Backends, the proxy's FTPS certificate, the ``[ftp]`` section and the banner lines."""
    ftp_dir = demo_dir / "ftp"
    ftp_dir.mkdir(parents=True, exist_ok=True)
    cert, key = ftp_dir / "proxy.crt", ftp_dir / "proxy.key"
    if not cert.exists() or not key.exists():
        chain, key_pem = self_signed(["localhost"], days=365)
        cert.write_bytes(chain)
        key.write_bytes(key_pem)
        key.chmod(0o600)
    config = (f'[ftp]\nlisten = ["127.0.0.1:{PROXY_PORT}"]\n'
              f"passive_ports = [{PASSIVE_PORTS[0]}, {PASSIVE_PORTS[1]}]\n"
              f'certificate_file = "{cert}"\nkey_file = "{key}"\n')
    if importlib.util.find_spec("pyftpdlib") is None:
        return DemoPart(config=config, commands="  ftp:     (backends need pyftpdlib: "
                        "pip install -e '.[test]')\n")
    processes: list[subprocess.Popen[bytes]] = []
    for name, port in BACKENDS:
        home = ftp_dir / name
        home.mkdir(exist_ok=True)
        (home / "hello.txt").write_text(f"Hello from the FTP backend on {name} (port {port}).\n")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "ftpproxy.devserver", "--port", str(port), "--root", str(home),
             "--user", f"{USER}:{PASSWORD}", "--name", name],
            stdout=subprocess.DEVNULL))
    url = f"ftp://{USER}:{PASSWORD}@127.0.0.1:{PROXY_PORT}"
    commands = (
        f"  ftp:     curl {url}/hello.txt          ({{demo_host}}; after the move below {{move_to}})\n"
        f"           curl {url}/                    (listing)   curl -T FILE {url}/\n"
        f"           curl --ssl-reqd --cacert {cert} ftp://{USER}:{PASSWORD}@localhost:{PROXY_PORT}/"
        "hello.txt   (FTPS)\n"
        f"           lftp -u {USER},{PASSWORD} -e 'set ssl:ca-file {cert}; ls; bye' "
        f"-p {PROXY_PORT} localhost\n"
        f"           python3 -c \"import ftplib; f = ftplib.FTP(); f.connect('127.0.0.1', {PROXY_PORT}); "
        f"f.login('{USER}', '{PASSWORD}'); f.dir()\"\n")
    return DemoPart(config=config, commands=commands, processes=processes)
