"""The shipped policies (policies/*.yaml) on real programs.

For each: a real program does its job under the policy, and a representative
forbidden action fails with EPERM while the program keeps running (so the
denial is seccomp's, not a crash). Programs run through capvisor's own spawn
path (tests/seccomp_exec.spawn_under: native.spawn with the compiled filter,
no Landlock), with pipes for stdio.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from supervisor import policy as P

from .seccomp_exec import spawn_under

PYTHON = "/usr/bin/python3"
SHIPPED = ("default", "compute", "service", "python", "shell")

pytestmark = pytest.mark.skipif(not Path(PYTHON).exists(), reason=f"{PYTHON} is needed")


def bpf(name: str) -> bytes:
    return P.compiled(name).bpf


def py(policy: str, code: str, *, extra_fds: tuple[int, ...] = ()) -> tuple[int, str, str]:
    status, out, err = spawn_under(bpf(policy), [PYTHON, "-S", "-c", code], extra_fds=extra_fds)
    return status, out.decode(), err.decode()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_policies_check_and_fit(name: str) -> None:
    compiled = P.compile_policy(P.load_policy(name))
    assert 0 < compiled.instructions <= 4096
    assert not compiled.policy.guards(), "shipped policies need no argument guard"


# -- compute --------------------------------------------------------------------------------


def test_compute_runs_a_filter_and_a_threaded_python() -> None:
    data = os.urandom(100_000)
    status, out, _ = spawn_under(bpf("compute"), ["/usr/bin/sha256sum"], stdin=data)
    assert status == 0
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
    status, out, err = py(
        "compute",
        "import threading, json, sys\n"
        "r = []\n"
        "ts = [threading.Thread(target=r.append, args=(i * i,)) for i in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(json.dumps(sorted(r)), open('/etc/hostname').read() != '')",
    )
    assert (status, out) == (0, "[0, 1, 4, 9] True\n"), err


def test_compute_forbids_new_files_and_sockets(tmp_path: Path) -> None:
    target = tmp_path / "new"
    status, out, err = py(
        "compute",
        "import os, socket\n"
        f"for what, call in (('creat', lambda: open({str(target)!r}, 'w')),\n"
        "                    ('socket', socket.socket),\n"
        "                    ('socketpair', socket.socketpair),\n"
        f"                    ('mkdir', lambda: os.mkdir({str(target)!r})),\n"
        "                    ('fork', os.fork)):\n"
        "    try:\n"
        "        call()\n"
        "        print(what, 'allowed')\n"
        "    except PermissionError:\n"
        "        print(what, 'EPERM')\n",
    )
    assert status == 0, err
    assert out.split("\n")[:-1] == [
        f"{w} EPERM" for w in ("creat", "socket", "socketpair", "mkdir", "fork")
    ]
    assert not target.exists()


# -- service --------------------------------------------------------------------------------

SERVER = """
import socket
listener = socket.socket(fileno=3)
conn, _ = listener.accept()
conn.sendall(conn.recv(100).upper())
conn.close()
spare = socket.socket(fileno=4)
for what, call in (("socket", socket.socket),
                   ("connect", lambda: spare.connect(("127.0.0.1", 9))),
                   ("bind", lambda: spare.bind(("127.0.0.1", 0))),
                   ("listen", lambda: spare.listen())):
    try:
        call()
        print(what, "allowed")
    except PermissionError:
        print(what, "EPERM")
"""


def test_service_serves_on_a_given_socket_and_makes_none() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    spare = socket.socket()
    result: list[tuple[int, str, str]] = []
    try:
        server = threading.Thread(
            target=lambda: result.append(
                py("service", SERVER, extra_fds=(listener.fileno(), spare.fileno()))
            )
        )
        server.start()
        with socket.create_connection(listener.getsockname(), timeout=30) as client:
            client.sendall(b"hello")
            assert client.recv(100) == b"HELLO"
        server.join(60)
    finally:
        listener.close()
        spare.close()
    status, out, err = result[0]
    assert status == 0, err
    assert out.split("\n")[:-1] == [f"{w} EPERM" for w in ("socket", "connect", "bind", "listen")]


# -- python ---------------------------------------------------------------------------------


def test_python_runs_asyncio_threads_and_files(tmp_path: Path) -> None:
    status, out, err = py(
        "python",
        "import asyncio, threading, pathlib, hashlib\n"
        "async def main():\n"
        "    await asyncio.sleep(0.01)\n"
        "    return await asyncio.get_running_loop().run_in_executor(None, sum, [1, 2, 3])\n"
        f"p = pathlib.Path({str(tmp_path)!r}) / 'x.txt'\n"
        "p.write_text('data')\n"
        "print(asyncio.run(main()), p.read_text(), hashlib.sha1(b'').hexdigest()[:4])",
    )
    assert (status, out) == (0, "6 data da39\n"), err


def test_python_forbids_new_processes() -> None:
    status, out, err = py(
        "python",
        "import os, subprocess\n"
        "for what, call in (('fork', os.fork),\n"
        "                   ('subprocess', lambda: subprocess.run(['/bin/true']))):\n"
        "    try:\n"
        "        call()\n"
        "        print(what, 'allowed')\n"
        "    except PermissionError:\n"
        "        print(what, 'EPERM')\n",
    )
    assert status == 0, err
    assert out == "fork EPERM\nsubprocess EPERM\n"


# -- shell ----------------------------------------------------------------------------------

SHELL_SCRIPT = (
    'echo hi | cat; n=$(ls / | sort | wc -l); test "$n" -gt 3 && echo many; '
    "printf 'b\\na\\nc\\n' | sort | tr '\\n' ' '; echo; seq 1 5 | wc -l; "
    'x=$(echo inner); echo "got $x"; echo saved > "$1/f"; cat "$1/f"; '
    "ls /nonexistent 2>/dev/null || echo missing"
)


def test_shell_runs_coreutils_pipelines_and_redirections(tmp_path: Path) -> None:
    status, out, err = spawn_under(
        bpf("shell"), ["/bin/sh", "-c", SHELL_SCRIPT, "sh", str(tmp_path)]
    )
    assert status == 0, err
    assert out.decode() == "hi\nmany\na b c \n5\ngot inner\nsaved\nmissing\n"


@pytest.mark.skipif(shutil.which("python3") is None, reason="python3 is needed")
def test_shell_forbids_sockets_even_to_its_children() -> None:
    script = (
        f"{PYTHON} -S -c 'import socket\ntry:\n socket.socketpair()\nexcept PermissionError:\n"
        ' print("socketpair EPERM")\'; echo still running'
    )
    status, out, err = spawn_under(bpf("shell"), ["/bin/sh", "-c", script])
    assert status == 0, err
    assert out.decode() == "socketpair EPERM\nstill running\n"
