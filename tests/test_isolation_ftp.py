"""Tenant isolation, FTP: login names that try to name another host or tenant, data
connections aimed at a third host (by the client with PORT/EPRT, by a hostile backend with
its PASV/EPSV reply), with the stdlib ftplib client and a real pyftpdlib backend. Another
tenant's host and a third address are trap listeners that record any connection."""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.test_ftp_proxy import (  # noqa: F401 - fixtures used below
    PASSWORD,
    USER,
    Backends,
    EdgeFactory,
    backends,
    connect,
    edges,
    provision,
    run,
    sqlite_store,
)

pytestmark = pytest.mark.timeout(120)


class Trap:
    """A listener on ``address`` recording every connection made to it (thread-based, so it
    sees connections while the test's client blocks in ftplib)."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.sock = socket.create_server((address, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.seen: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.seen.append(peer)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@contextlib.contextmanager
def trap(address: str = "127.0.0.1") -> Iterator[Trap]:
    t = Trap(address)
    try:
        yield t
    finally:
        t.close()


def refused_login(port: int, user: str, password: str = PASSWORD) -> str:
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", port)
    try:
        ftp.login(user, password)
    except ftplib.error_perm as exc:
        return str(exc)
    finally:
        with contextlib.suppress(Exception):
            ftp.close()
    return "230 logged in"


TRICKS = ["alice@host-b", "alice%host-b", "alice@127.0.0.1", "host-b/alice", "alice:host-b",
          "bob@host-a", "alice bob", "alice\tbob", "ALICE@HOST-B", "../bob", "alice;bob",
          "b" * 300, "alice\u200b", "\u0430lice"]  # zero-width space; Cyrillic a


async def test_login_names_never_reach_another_tenants_host(edges: EdgeFactory,  # noqa: F811
                                                            backends: Backends) -> None:  # noqa: F811
    """Tenant t1 (alice) lives on backend a; tenant t2 (bob) on host-b, which is a trap.
    No spelling of a name routes a login to host-b, and none logs in anywhere."""
    backend = await backends.start()
    await provision(edges.service, backend)
    with trap() as host_b:
        await edges.service.add_host("host-b", "127.0.0.1", ftp_port=host_b.port)
        await edges.service.add_tenant("t2", "host-b")
        await edges.service.add_account("bob", "t2", protocols=["ftp"])
        edge = await edges.start()
        for name in TRICKS:
            answer = await run(lambda name=name: refused_login(edge.port, name))
            assert answer.startswith("530"), (name, answer)
        await asyncio.sleep(0.5)
        assert host_b.seen == []


async def test_eprt_to_a_third_host_connects_back_to_the_client(edges: EdgeFactory,  # noqa: F811
                                                                backends: Backends) -> None:  # noqa: F811
    """EPRT naming another address (the IPv4 form; the PORT form is in test_ftp_proxy): the
    data connection goes to the client's own control address, never to the named host."""
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()
    (backend.root / "a.txt").write_bytes(b"mine" * 10)

    def session() -> None:
        victim = socket.create_server(("127.0.0.2", 0))
        victim.settimeout(0.5)
        port = victim.getsockname()[1]
        try:
            mine = socket.create_server(("127.0.0.1", port))
        except OSError:
            pytest.skip("port taken on 127.0.0.1")
        ftp = connect(edge.port)
        assert ftp.sendcmd(f"EPRT |1|127.0.0.2|{port}|").startswith("200")
        ftp.putcmd("RETR a.txt")
        assert ftp.getresp()[:1] == "1"
        conn, _ = mine.accept()
        assert conn.recv(100) == b"mine" * 10
        conn.close()
        assert ftp.getresp().startswith("226")
        with pytest.raises(TimeoutError):
            victim.accept()
        victim.close()
        mine.close()
        ftp.quit()

    await run(session)


async def hostile_backend(data_address: str, data_port: int) -> asyncio.Server:
    """An FTP server that logs anyone in and answers PASV/EPSV with someone else's address."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hostile\r\n")
        p1, p2 = divmod(data_port, 256)
        answers = {
            b"USER": b"331 go on\r\n", b"PASS": b"230 in\r\n", b"TYPE": b"200 ok\r\n",
            b"PASV": b"227 Entering Passive Mode (%s,%d,%d).\r\n" % (
                data_address.replace(".", ",").encode(), p1, p2),
            b"EPSV": b"229 Entering Extended Passive Mode (|||%d|)\r\n" % data_port,
            b"QUIT": b"221 bye\r\n",
        }
        with contextlib.suppress(Exception):
            while line := await reader.readline():
                verb = line.split()[0].upper() if line.split() else b""
                writer.write(answers.get(verb, b"150 here it comes\r\n" if verb == b"RETR"
                                         else b"502 no\r\n"))
                await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def test_backend_passive_reply_naming_a_third_host_is_refused(edges: EdgeFactory) -> None:  # noqa: F811
    """A tenant's own (hostile or hacked) FTP server cannot make the proxy connect to another
    address: its PASV reply naming 127.0.0.2 is refused and nothing connects there."""
    with trap("127.0.0.2") as third:
        server = await hostile_backend("127.0.0.2", third.port)
        port = server.sockets[0].getsockname()[1]
        await edges.service.add_host("host-h", "127.0.0.1", ftp_port=port)
        await edges.service.add_tenant("th", "host-h")
        await edges.service.add_account(USER, "th", protocols=["ftp"])
        edge = await edges.start()

        def session() -> str:
            ftp = connect(edge.port)
            try:
                ftp.retrbinary("RETR x", lambda _: None)
            except ftplib.Error as exc:
                return str(exc)
            finally:
                with contextlib.suppress(Exception):
                    ftp.close()
            return "transferred"

        answer = await run(session)
        server.close()
        await asyncio.sleep(0.3)
        assert answer[:1] in ("4", "5"), answer
        assert third.seen == []


async def test_site_and_other_commands_before_login_reach_no_backend(
        edges: EdgeFactory, backends: Backends) -> None:  # noqa: F811
    backend = await backends.start()
    await provision(edges.service, backend)
    with trap() as host_b:
        await edges.service.add_host("host-b", "127.0.0.1", ftp_port=host_b.port)
        edge = await edges.start()

        def session() -> list[str]:
            ftp = ftplib.FTP(timeout=30)
            ftp.connect("127.0.0.1", edge.port)
            answers = []
            for command in ("SITE EXEC id", "SITE CPFR /etc/passwd", "PORT 127,0,0,1,4,1",
                            "PASV", "RETR /etc/passwd", "CWD /", "STAT", "HOST host-b"):
                try:
                    answers.append(ftp.sendcmd(command))
                except ftplib.Error as exc:
                    answers.append(str(exc))
            ftp.close()
            return answers

        answers = await run(session)
        assert all(a[:1] in ("4", "5") for a in answers if not a.startswith("211")), answers
        assert host_b.seen == []
