"""The CRI ImageService and the gRPC server, through a real client on a unix socket.

The server runs in-process on its own trio thread (``serve_grpc``); the
tests are the gRPC client, over a real socket.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import trio
from cri_api.v1 import api_pb2, api_pb2_grpc

from supervisor.cri.image_service import ImageService
from supervisor.cri.images import ImageStore
from supervisor.cri.server import serve_grpc


@contextmanager
def running(implementations: list[object], socket: Path) -> Iterator[str]:
    """Serve ``implementations`` on ``socket`` from a trio loop in a thread."""
    started = threading.Event()
    state: dict[str, object] = {}

    async def main() -> None:
        state["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            state["scope"] = nursery.cancel_scope
            await nursery.start(
                lambda task_status: serve_grpc(
                    f"unix://{socket}", implementations, task_status=task_status
                )
            )
            started.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:
            state["error"] = exc
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    if "error" in state:
        raise state["error"]  # type: ignore[misc]
    try:
        yield f"unix://{socket}"
    finally:
        scope = state["scope"]
        trio.from_thread.run_sync(scope.cancel, trio_token=state["token"])  # type: ignore[attr-defined]
        thread.join(10)
        assert not thread.is_alive()
        assert not socket.exists(), "the socket is removed when the server stops"


@pytest.fixture
def images(tmp_path: Path) -> Iterator[tuple[api_pb2_grpc.ImageServiceStub, ImageStore]]:
    store = ImageStore(tmp_path / "images")
    with (
        running([ImageService(store)], tmp_path / "cri.sock") as target,
        grpc.insecure_channel(target) as channel,
    ):
        yield api_pb2_grpc.ImageServiceStub(channel), store


def executable(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    path.chmod(0o755)
    return path


def not_executable(path: Path) -> str:
    path.write_bytes(b"data")
    path.chmod(0o644)
    return str(path)


def spec(ref: str) -> api_pb2.ImageSpec:
    return api_pb2.ImageSpec(image=ref)


def test_pull_names_and_content_address(images, tmp_path: Path) -> None:
    stub, store = images
    prog = executable(tmp_path / "prog", b"#!/bin/sh\necho one\n")
    digest = "sha256:" + hashlib.sha256(prog.read_bytes()).hexdigest()

    by_path = stub.PullImage(api_pb2.PullImageRequest(image=spec(str(prog))))
    by_url = stub.PullImage(api_pb2.PullImageRequest(image=spec(f"file://{prog}")))
    assert by_path.image_ref == by_url.image_ref == digest

    listed = stub.ListImages(api_pb2.ListImagesRequest()).images
    assert [i.id for i in listed] == [digest]
    assert sorted(listed[0].repo_tags) == sorted([str(prog), f"file://{prog}"])
    assert listed[0].size == prog.stat().st_size
    # The store holds a read-only copy: changing the source changes nothing.
    stored = store.lookup(digest)
    assert stored is not None and stored.path.read_bytes() == prog.read_bytes()
    assert not stored.path.stat().st_mode & 0o222
    # The form a kubelet accepts as an image name: localhost/PATH:TAG.
    kubelet = stub.PullImage(api_pb2.PullImageRequest(image=spec(f"localhost{prog}:latest")))
    assert kubelet.image_ref == digest
    for ref in (str(prog), f"file://{prog}", f"localhost{prog}:latest", digest, digest[7:]):
        status = stub.ImageStatus(api_pb2.ImageStatusRequest(image=spec(ref)))
        assert status.image.id == digest, ref

    # Pulling a name again after the file changed moves the name to the new content.
    executable(prog, b"#!/bin/sh\necho two\n")
    second = stub.PullImage(api_pb2.PullImageRequest(image=spec(str(prog)))).image_ref
    assert second != digest
    assert stub.ImageStatus(api_pb2.ImageStatusRequest(image=spec(str(prog)))).image.id == second
    old = stub.ImageStatus(api_pb2.ImageStatusRequest(image=spec(digest))).image
    assert old.repo_tags == [f"file://{prog}", f"localhost{prog}:latest"]
    filtered = stub.ListImages(
        api_pb2.ListImagesRequest(filter=api_pb2.ImageFilter(image=spec(second)))
    )
    assert [i.id for i in filtered.images] == [second]

    # The index survives a restart of the store.
    again = ImageStore(store.root)
    assert again.lookup(str(prog)).id == second  # type: ignore[union-attr]


def test_status_of_absent_image_is_empty_and_remove_is_idempotent(images, tmp_path) -> None:
    stub, _ = images
    status = stub.ImageStatus(api_pb2.ImageStatusRequest(image=spec("/no/such/image")))
    assert not status.HasField("image")
    prog = executable(tmp_path / "p", b"\x7fELF not really")
    ref = stub.PullImage(api_pb2.PullImageRequest(image=spec(str(prog)))).image_ref
    for _ in range(2):
        stub.RemoveImage(api_pb2.RemoveImageRequest(image=spec(str(prog))))
    assert not stub.ImageStatus(api_pb2.ImageStatusRequest(image=spec(ref))).HasField("image")
    assert stub.ListImages(api_pb2.ListImagesRequest()).images == []
    stub.RemoveImage(api_pb2.RemoveImageRequest(image=spec("sha256:" + "0" * 64)))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: "relative/prog", "absolute path, a file:// URL or localhost/PATH"),
        (
            lambda d: "docker.io/library/busybox:latest",
            "absolute path, a file:// URL or localhost/PATH",
        ),
        (lambda d: str(d / "missing"), "No such file or directory"),
        (lambda d: f"file://host{d}/x", "file:///absolute/path"),
        (lambda d: str(d), "is not a regular file"),
        (lambda d: not_executable(d / "plain"), "is not executable"),
    ],
)
def test_pull_refuses_with_a_clear_message(images, tmp_path, make, message) -> None:
    stub, _ = images
    with pytest.raises(grpc.RpcError) as err:
        stub.PullImage(api_pb2.PullImageRequest(image=spec(make(tmp_path))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_image_fs_info(images, tmp_path) -> None:
    stub, store = images
    prog = executable(tmp_path / "p", b"x" * 1000)
    stub.PullImage(api_pb2.PullImageRequest(image=spec(str(prog))))
    info = stub.ImageFsInfo(api_pb2.ImageFsInfoRequest())
    (fs,) = info.image_filesystems
    assert fs.used_bytes.value == 1000 and fs.inodes_used.value == 1
    assert fs.fs_id.mountpoint == str(store.root)
    assert fs.timestamp > 0


def test_every_other_rpc_is_unimplemented_by_name(images, tmp_path) -> None:
    # Only the ImageService is served here: every RuntimeService RPC is unimplemented,
    # the streaming one included.
    with grpc.insecure_channel(f"unix://{tmp_path / 'cri.sock'}") as channel:
        runtime = api_pb2_grpc.RuntimeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            runtime.Attach(api_pb2.AttachRequest(container_id="x"))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "runtime.v1.RuntimeService/Attach" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(runtime.GetContainerEvents(api_pb2.GetEventsRequest()))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "GetContainerEvents" in err.value.details()


def test_concurrent_pulls_from_many_threads(images, tmp_path) -> None:
    """32 pulls of 8 files from 16 client threads: every answer right, the index whole."""
    stub, store = images
    progs = [executable(tmp_path / f"p{i}", os.urandom(256 << 10)) for i in range(8)]
    want = {str(p): "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() for p in progs}

    def pull(i: int) -> tuple[str, str]:
        ref = str(progs[i % 8])
        return ref, stub.PullImage(api_pb2.PullImageRequest(image=spec(ref))).image_ref

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(pull, range(32)))
    assert all(want[ref] == got for ref, got in results)
    listed = stub.ListImages(api_pb2.ListImagesRequest()).images
    assert {i.id for i in listed} == set(want.values())
    assert {t for i in listed for t in i.repo_tags} == set(want)
    assert not [p for p in store.blobs.iterdir() if p.name.startswith(".")], "no temp files left"
