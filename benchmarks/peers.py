"""The peers our proxies are compared with, configured the way a hoster would without a
directory: nginx and haproxy with a static map hostname → backend host (one upstream per
simulated host, keep-alive to the backends, caching of ``/c/`` paths in the cache-on runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.procs import Child, free_port, nginx_main_conf, start_haproxy, start_nginx

Upstreams = Mapping[str, tuple[str, int]]
"""Upstream (simulated host) name → (address, port) of its backend."""


async def start_nginx_proxy(workdir: Path, routes: Mapping[str, str], upstreams: Upstreams, *,
                            workers: int = 1, name: str = "nginx-proxy", access_log: str = "") -> Child:
    """nginx reverse proxy: ``map $host`` → upstream; 404 for unknown hosts (no open proxy).
    ``/c/...`` is cached (``proxy_cache``), everything else is not. ``child.ports["http"]``.
    ``access_log``: a file for nginx's default (combined, unbuffered) access log, "" = off."""
    port = free_port()
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    ups = "\n".join(f"  upstream {u} {{ server {a}:{p}; keepalive 32; }}"
                    for u, (a, p) in upstreams.items())
    entries = "\n".join(f"    {host} {u};" for host, u in routes.items())
    body = f"""
  proxy_cache_path {folder}/cache levels=1:2 keys_zone=edge:16m max_size=256m inactive=10m;
{ups}
  map $host $edge_upstream {{
    hostnames;
    default "";
{entries}
  }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    server_name _;
    {f"access_log {access_log};" if access_log else ""}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $remote_addr;
    location / {{
      if ($edge_upstream = "") {{ return 404; }}
      proxy_pass http://$edge_upstream;
    }}
    location /c/ {{
      if ($edge_upstream = "") {{ return 404; }}
      proxy_cache edge;
      proxy_pass http://$edge_upstream;
    }}
  }}"""
    child = await start_nginx(workdir, name, nginx_main_conf(folder, body, workers=workers),
                              [("127.0.0.1", port)])
    child.ports["http"] = port
    return child


async def start_haproxy_proxy(workdir: Path, routes: Mapping[str, str], upstreams: Upstreams, *,
                              threads: int = 1, name: str = "haproxy") -> Child:
    """haproxy: ``map(hosts.map)`` on the Host header → backend; ``/c/`` through its cache."""
    port = free_port()
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    hosts_map = folder / "hosts.map"
    hosts_map.write_text("".join(f"{host} {u}\n" for host, u in routes.items()))
    backends = "\n".join(
        f"backend {u}\n  http-reuse always\n"
        f"  http-request cache-use edge if {{ path_beg /c/ }}\n"
        f"  http-response cache-store edge\n"
        f"  server s {a}:{p} maxconn 256\n" for u, (a, p) in upstreams.items())
    conf = f"""
global
  nbthread {threads}
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
cache edge
  total-max-size 64
  max-age 300
frontend web
  bind 127.0.0.1:{port}
  http-request set-var(txn.backend) req.hdr(host),lower,map({hosts_map})
  http-request return status 404 if !{{ var(txn.backend) -m found }}
  use_backend %[var(txn.backend)]
{backends}
"""
    child = await start_haproxy(workdir, name, conf, [("127.0.0.1", port)])
    child.ports["http"] = port
    return child


async def start_nginx_tls(workdir: Path, certs: Sequence[tuple[Sequence[str], str, str]],
                          upstream: tuple[str, int], *, workers: int = 1,
                          name: str = "nginx-tls") -> Child:
    """nginx terminating TLS with one ``server`` block per certificate (the static way:
    every certificate preloaded). ``certs`` = (names, chain PEM, key PEM)."""
    port = free_port()
    folder = workdir / name
    (folder / "certs").mkdir(parents=True, exist_ok=True)
    servers = []
    for i, (names, chain, key) in enumerate(certs):
        (folder / "certs" / f"{i}.crt").write_text(chain)
        (folder / "certs" / f"{i}.key").write_text(key)
        servers.append(f"""  server {{
    listen 127.0.0.1:{port} ssl{' reuseport' if i == 0 else ''};
    server_name {' '.join(names)};
    ssl_certificate {folder}/certs/{i}.crt;
    ssl_certificate_key {folder}/certs/{i}.key;
    ssl_session_cache off;
    ssl_session_tickets off;
    ssl_protocols TLSv1.2 TLSv1.3;  # 1.22's default stops at TLSv1.2; the edge speaks 1.3
    location / {{ proxy_pass http://{upstream[0]}:{upstream[1]}; }}
  }}""")
    child = await start_nginx(workdir, name, nginx_main_conf(folder, "\n".join(servers),
                                                             workers=workers),
                              [("127.0.0.1", port)])
    child.ports["https"] = port
    return child
