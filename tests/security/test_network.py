"""Network escapes: new sockets, unix sockets by name, TCP and UDP.

Listeners are throwaway ones the test opens on loopback or in its own
directory; after each attack the test checks that nothing reached them.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from .conftest import Hostile
from .harness import attack

#: sendto/connect through an AF_UNIX datagram socket from socketpair(), the
#: only way to a named unix socket once socket() is denied.
UNIX_DGRAM = """
#include <sys/socket.h>
#include <sys/un.h>
static socklen_t unix_addr(struct sockaddr_un *a, const char *name, int abstract) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    strncpy(a->sun_path + (abstract ? 1 : 0), name, sizeof a->sun_path - 2);
    return offsetof(struct sockaddr_un, sun_path) + (abstract ? 1 : 0) + strlen(name) + !abstract;
}
"""


def _nothing_arrived(*socks: socket.socket) -> None:
    for sock in socks:
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            if sock.type == socket.SOCK_STREAM:
                sock.accept()
            else:
                sock.recv(100)


@pytest.fixture
def names() -> Iterator[str]:
    yield f"capvisor-battery-{os.getpid()}-{time.monotonic_ns()}"


@attack("TCP and UDP connect and bind, raw and netlink sockets", "seccomp (socket() denied)")
def test_tcp_and_udp(hostile: Hostile) -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        udp.bind(("127.0.0.1", 0))
        prog = hostile.c(
            "inet",
            """
            #include <arpa/inet.h>
            #include <sys/socket.h>
            int main(int argc, char **argv) {
                struct sockaddr_in tcp = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
                struct sockaddr_in udp = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
                tcp.sin_addr.s_addr = udp.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
                int t = TRY("tcp-socket", socket(AF_INET, SOCK_STREAM, 0));
                TRY("tcp-connect", connect(t, (struct sockaddr *)&tcp, sizeof tcp));
                int u = TRY("udp-socket", socket(AF_INET, SOCK_DGRAM, 0));
                TRY("udp-sendto", sendto(u, "x", 1, 0, (struct sockaddr *)&udp, sizeof udp));
                TRY("tcp6-socket", socket(AF_INET6, SOCK_STREAM, 0));
                TRY("raw-socket", socket(AF_PACKET, SOCK_RAW, 0));
                TRY("netlink-socket", socket(AF_NETLINK, SOCK_RAW, 0));
                /* Allowed, this would be EAFNOSUPPORT: EPERM is the filter. */
                TRY("bogus-family", socket(4242, SOCK_STREAM, 0));
                /* bind is denied outright; connect on a unix pair: wrong family. */
                int sv[2];
                socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
                TRY("pair-bind-inet", bind(sv[0], (struct sockaddr *)&tcp, sizeof tcp));
                TRY("pair-connect-inet", connect(sv[0], (struct sockaddr *)&tcp, sizeof tcp));
                DONE();
            }
            """,
        )
        out = hostile.run(prog, str(tcp.getsockname()[1]), str(udp.getsockname()[1]))
        _nothing_arrived(tcp, udp)
    assert out.lines == [
        "tcp-socket EPERM",
        "tcp-connect EBADF",
        "udp-socket EPERM",
        "udp-sendto EBADF",
        "tcp6-socket EPERM",
        "raw-socket EPERM",
        "netlink-socket EPERM",
        "bogus-family EPERM",
        "pair-bind-inet EPERM",
        "pair-connect-inet EINVAL",
        "done",
    ]


@attack(
    "connect or send to an abstract unix socket",
    "seccomp (socket(), datagram socketpair denied); Landlock scope (on a granted socket)",
)
def test_abstract_unix_sockets(hostile: Hostile, names: str) -> None:
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram,
    ):
        stream.bind("\0" + names + "-stream")
        stream.listen()
        dgram.bind("\0" + names + "-dgram")
        prog = hostile.c(
            "abstract",
            UNIX_DGRAM
            + """
            int main(int argc, char **argv) {
                char stream_name[108], dgram_name[108];
                struct sockaddr_un a;
                snprintf(stream_name, sizeof stream_name, "%s-stream", argv[1]);
                snprintf(dgram_name, sizeof dgram_name, "%s-dgram", argv[1]);
                TRY("socket", socket(AF_UNIX, SOCK_STREAM, 0));
                int sv[2];
                TRY("socketpair-dgram", socketpair(AF_UNIX, SOCK_DGRAM, 0, sv));
                TRY("socketpair-stream", socketpair(AF_UNIX, SOCK_STREAM, 0, sv));
                socklen_t n = unix_addr(&a, stream_name, 1);
                TRY("pair-connect", connect(sv[0], (struct sockaddr *)&a, n));
                /* fd 3: an unconnected datagram socket the description grants,
                   bound to an abstract name of its own. Only Landlock's scope
                   stands between it and every other abstract name. */
                n = unix_addr(&a, dgram_name, 1);
                TRY("granted-sendto", sendto(3, "x", 1, 0, (struct sockaddr *)&a, n));
                TRY("granted-connect", connect(3, (struct sockaddr *)&a, n));
                DONE();
            }
            """,
        )
        grant = f"fds:\n  mine: !socket {{bind: 'unix:@{names}-mine', type: dgram}}\n"
        out = hostile.run(prog, names, extra=grant)
        _nothing_arrived(stream, dgram)
    assert out.lines == [
        "socket EPERM",
        "socketpair-dgram EPERM",
        "socketpair-stream ok",
        "pair-connect EISCONN",
        "granted-sendto EPERM",
        "granted-connect EPERM",
        "done",
    ]


@attack("bind (squat) an abstract unix socket name", "seccomp (bind denied)")
def test_abstract_name_squatting(hostile: Hostile, names: str) -> None:
    prog = hostile.c(
        "squat",
        UNIX_DGRAM
        + """
        int main(int argc, char **argv) {
            struct sockaddr_un a;
            int sv[2];
            socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
            socklen_t n = unix_addr(&a, argv[1], 1);
            TRY("bind", bind(sv[0], (struct sockaddr *)&a, n));
            DONE();
        }
        """,
    )
    out = hostile.run(prog, names)
    assert out.lines == ["bind EPERM", "done"], (
        "HOLE: a confined program bound an abstract unix socket name (while it runs, the "
        "service that owns the name cannot start)"
    )


@attack(
    "connect or send to a pathname unix socket",
    "seccomp (socket(), datagram socketpair denied)",
)
def test_pathname_unix_sockets(hostile: Hostile) -> None:
    work = hostile.work
    stream_path, dgram_path = str(work / "stream.sock"), str(work / "dgram.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram,
    ):
        stream.bind(stream_path)
        stream.listen()
        dgram.bind(dgram_path)
        for path in (stream_path, dgram_path):
            os.chmod(path, 0o777)
        prog = hostile.c(
            "pathname",
            UNIX_DGRAM
            + """
            int main(int argc, char **argv) {
                struct sockaddr_un a;
                int s = TRY("socket", socket(AF_UNIX, SOCK_STREAM, 0));
                socklen_t n = unix_addr(&a, argv[1], 0);
                TRY("connect-stream", connect(s, (struct sockaddr *)&a, n));
                int sv[2];
                /* Landlock (ABI 7) cannot see pathname sockets: a datagram
                   socket of a pair could sendto() any of them. */
                TRY("socketpair-dgram", socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv));
                TRY("socketpair-stream", socketpair(AF_UNIX, SOCK_STREAM, 0, sv));
                n = unix_addr(&a, argv[2], 0);
                TRY("pair-sendto", sendto(sv[0], "escaped", 7, 0, (struct sockaddr *)&a, n));
                n = unix_addr(&a, argv[1], 0);
                TRY("pair-connect", connect(sv[0], (struct sockaddr *)&a, n));
                DONE();
            }
            """,
        )
        out = hostile.run(prog, stream_path, dgram_path)
        _nothing_arrived(stream, dgram)
    assert out.lines == [
        "socket EPERM",
        "connect-stream EBADF",
        "socketpair-dgram EPERM",
        "socketpair-stream ok",
        "pair-sendto EISCONN",
        "pair-connect EISCONN",
        "done",
    ]
