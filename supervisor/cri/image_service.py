"""The CRI ImageService over the :class:`~supervisor.cri.images.ImageStore`.

Each method is an async handler run on the trio thread (see
:mod:`supervisor.cri.server`); the file copy of a pull runs in a worker
thread so other requests go on meanwhile.
"""

from __future__ import annotations

import json
import time

import trio
from cri_api.v1 import api_pb2

from .images import Image, ImageStore
from .status import invalid


def image_message(image: Image) -> api_pb2.Image:
    """The CRI ``Image`` for a stored image."""
    return api_pb2.Image(
        id=image.id,
        repo_tags=list(image.names),
        repo_digests=[],
        size=image.size,
        spec=api_pb2.ImageSpec(image=image.id),
    )


class ImageService:
    """ListImages, ImageStatus, PullImage, RemoveImage, ImageFsInfo."""

    def __init__(self, store: ImageStore) -> None:
        self.store = store

    async def ListImages(self, request: api_pb2.ListImagesRequest) -> api_pb2.ListImagesResponse:
        wanted = request.filter.image.image if request.HasField("filter") else ""
        if wanted:
            found = self.store.lookup(wanted)
            images = [found] if found is not None else []
        else:
            images = self.store.images()
        return api_pb2.ListImagesResponse(images=[image_message(i) for i in images])

    async def ImageStatus(self, request: api_pb2.ImageStatusRequest) -> api_pb2.ImageStatusResponse:
        image = self.store.lookup(request.image.image)
        if image is None:  # the CRI: no image and no error when absent
            return api_pb2.ImageStatusResponse()
        info = {}
        if request.verbose:
            info["info"] = json.dumps({"path": str(image.path), "pulled_at": image.pulled_at})
        return api_pb2.ImageStatusResponse(image=image_message(image), info=info)

    async def PullImage(self, request: api_pb2.PullImageRequest) -> api_pb2.PullImageResponse:
        reference = request.image.image
        if not reference:
            raise invalid("PullImageRequest.image.image", "must not be empty")
        image_id = await trio.to_thread.run_sync(self.store.store_blob, reference)
        image = self.store.name(reference, image_id)
        return api_pb2.PullImageResponse(image_ref=image.id)

    async def RemoveImage(self, request: api_pb2.RemoveImageRequest) -> api_pb2.RemoveImageResponse:
        if not request.image.image:
            raise invalid("RemoveImageRequest.image.image", "must not be empty")
        self.store.remove(request.image.image)  # idempotent: an absent image is fine
        return api_pb2.RemoveImageResponse()

    async def ImageFsInfo(self, request: api_pb2.ImageFsInfoRequest) -> api_pb2.ImageFsInfoResponse:
        used, inodes = self.store.usage()
        usage = api_pb2.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(self.store.root)),
            used_bytes=api_pb2.UInt64Value(value=used),
            inodes_used=api_pb2.UInt64Value(value=inodes),
        )
        return api_pb2.ImageFsInfoResponse(image_filesystems=[usage], container_filesystems=[usage])
