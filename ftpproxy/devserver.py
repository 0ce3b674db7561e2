"""A pyftpdlib FTP/FTPS server for the demo, the tests and the benchmarks (never production).

Run ``python -m ftpproxy.devserver --port 0 --root DIR --user alice:secret`` (``--user`` may
repeat; add ``--certfile cert.pem`` for explicit FTPS). It prints ``LISTENING <port>`` on
stdout once it accepts connections, then serves until killed. Needs the ``test`` extra
(pyftpdlib; pyOpenSSL for TLS).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Any


def build_server(args: argparse.Namespace) -> Any:
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.servers import FTPServer

    authorizer = DummyAuthorizer()
    for spec in args.user:
        name, _, password = spec.partition(":")
        home = os.path.join(args.root, name) if args.per_user_dirs else args.root
        os.makedirs(home, exist_ok=True)
        authorizer.add_user(name, password, home, perm="elradfmwMT")
    handler: Any
    if args.certfile:
        from OpenSSL import SSL
        from pyftpdlib.handlers import TLS_FTPHandler

        handler = type("Handler", (TLS_FTPHandler,), {})
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate_chain_file(args.certfile)
        context.use_privatekey_file(args.keyfile or args.certfile)
        context.set_options(SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_COMPRESSION)
        # A session id context lets data connections resume the control session.
        context.set_session_id(b"ftpproxy-devserver")
        handler.ssl_context = context
        handler.tls_control_required = args.tls_required
        handler.tls_data_required = args.tls_required
    else:
        from pyftpdlib.handlers import FTPHandler

        handler = type("Handler", (FTPHandler,), {})
    handler.authorizer = authorizer
    handler.auth_failed_timeout = args.auth_failed_delay
    handler.banner = f"devserver {args.name} ready."
    handler.use_sendfile = True
    if args.masquerade:
        handler.masquerade_address = args.masquerade
    handler.timeout = args.idle_timeout
    if args.refuse_data:
        _refuse_data_connections(handler, args.refuse_data)
    return FTPServer((args.host, args.port), handler)


def _refuse_data_connections(handler: Any, count: int) -> None:
    """The first ``count`` PASV/EPSV replies name a port nobody listens on any more (a broken
    backend, for the tests: the proxy must answer 425 and keep the session usable)."""
    left = [count]

    def refusing(name: str) -> Any:
        original = getattr(handler, name)

        def command(self: Any, line: str) -> None:
            original(self, line)
            if left[0] > 0 and self._dtp_acceptor is not None:
                left[0] -= 1
                self._shutdown_connecting_dtp()
        return command

    handler.ftp_PASV = refusing("ftp_PASV")
    handler.ftp_EPSV = refusing("ftp_EPSV")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftpproxy.devserver", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--root", required=True, help="home directory of the users")
    parser.add_argument("--user", action="append", default=[], help="NAME:PASSWORD (repeatable)")
    parser.add_argument("--per-user-dirs", action="store_true", help="home = ROOT/NAME")
    parser.add_argument("--certfile", default="", help="PEM certificate (+key): explicit FTPS")
    parser.add_argument("--keyfile", default="")
    parser.add_argument("--tls-required", action="store_true")
    parser.add_argument("--auth-failed-delay", type=float, default=0.0,
                        help="seconds before 530 on a wrong password (pyftpdlib default 3)")
    parser.add_argument("--name", default="backend", help="shown in the greeting")
    parser.add_argument("--masquerade", default="", help="address put in PASV replies")
    parser.add_argument("--refuse-data", type=int, default=0, metavar="N",
                        help="close the first N passive listeners right after PASV/EPSV (tests)")
    parser.add_argument("--idle-timeout", type=float, default=300.0,
                        help="seconds of control-connection inactivity before 421")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    server = build_server(args)
    print(f"LISTENING {server.address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever(handle_exit=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
