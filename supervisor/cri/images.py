"""The image store: a content-addressed store of executables.

An *image* is one executable file. Pulling copies it from a local path or a
``file://`` URL into ``ROOT/blobs/sha256/HEX`` (read-only, executable); its
id is ``sha256:HEX``, the digest of its bytes, so pulling the same bytes
twice stores them once. The references it was pulled by (its *names*, the
CRI's ``repo_tags``) map to ids in ``ROOT/index.json``, rewritten atomically
on each change. Pulling a reference again moves that name to the new
content; an image that lost all its names stays listed until removed.

Pure file operations, no trio: callers run :meth:`ImageStore.pull` (which
reads and hashes the whole file) in a worker thread. Every method may be
called from one thread at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CapvisorError

_CHUNK = 1 << 20


class ImageError(CapvisorError):
    """A reference that cannot be pulled (bad form, missing, not executable)."""


@dataclass(frozen=True)
class Image:
    """A stored executable: its id, size, the names it has, where it lies."""

    id: str
    size: int
    path: Path
    names: tuple[str, ...] = field(default=())
    pulled_at: int = 0


def source_path(reference: str) -> Path:
    """The local file a reference names.

    ``/abs/path``, ``file:///abs/path``, or ``localhost/abs/path[:TAG]`` (a
    form the kubelet's image-name parser accepts; the tag is ignored, so
    ``localhost/usr/bin/sleep:latest`` is ``/usr/bin/sleep``). Raises
    :class:`ImageError` for any other form.
    """
    if reference.startswith("localhost/"):
        path = reference.removeprefix("localhost").split("@", 1)[0]
        head, _, last = path.rpartition("/")
        return Path(f"{head}/{last.split(':', 1)[0]}")
    if reference.startswith("file:"):
        url = urllib.parse.urlsplit(reference)
        if url.netloc not in ("", "localhost") or not url.path.startswith("/"):
            raise ImageError(f"image {reference!r}: a file URL is file:///absolute/path")
        return Path(urllib.parse.unquote(url.path))
    if reference.startswith("/"):
        return Path(reference)
    raise ImageError(
        f"image {reference!r}: capvisor images are executables named by an absolute path, "
        "a file:// URL or localhost/PATH[:TAG]"
    )


class ImageStore:
    """Executables by digest under ``root``, with names mapped to ids."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._index_path = self.root / "index.json"
        self._names: dict[str, str] = {}
        self._pulled: dict[str, int] = {}
        self._load()

    # --- queries -----------------------------------------------------------

    def lookup(self, reference: str) -> Image | None:
        """The image a name, an id (``sha256:HEX``) or a bare digest names, or None."""
        image_id = self._names.get(reference)
        if image_id is None:
            image_id = reference if reference.startswith("sha256:") else f"sha256:{reference}"
        return self._image(image_id)

    def images(self) -> list[Image]:
        """Every stored image, oldest pull first."""
        found = [self._image(f"sha256:{p.name}") for p in self.blobs.iterdir()]
        return sorted((i for i in found if i is not None), key=lambda i: (i.pulled_at, i.id))

    def usage(self) -> tuple[int, int]:
        """Bytes and inodes the stored images use."""
        images = self.images()
        return sum(i.size for i in images), len(images)

    # --- changes -----------------------------------------------------------

    def pull(self, reference: str) -> Image:
        """Copy the executable ``reference`` names into the store; its image.

        :meth:`store_blob` then :meth:`name`. Raises :class:`ImageError` when
        the file is missing, unreadable, not a regular file or not executable.
        """
        return self.name(reference, self.store_blob(reference))

    def store_blob(self, reference: str) -> str:
        """Copy the executable ``reference`` names into the store; its id.

        Touches no name, so it may run in a worker thread while the store is
        used from another one. Raises :class:`ImageError`.
        """
        source = source_path(reference)
        digest = hashlib.sha256()
        try:
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise ImageError(f"image {reference!r}: {source}: {exc.strerror}") from exc
        tmp = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"image {reference!r}: {source} is not a regular file")
            if not st.st_mode & 0o111:
                raise ImageError(f"image {reference!r}: {source} is not executable")
            handle, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".pull-")
            with os.fdopen(handle, "wb") as out:
                while chunk := os.read(fd, _CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o555)
            target = self.blobs / digest.hexdigest()
            os.replace(tmp, target)
            tmp = None
        except OSError as exc:
            raise ImageError(f"image {reference!r}: storing {source}: {exc.strerror}") from exc
        finally:
            os.close(fd)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return f"sha256:{digest.hexdigest()}"

    def name(self, reference: str, image_id: str) -> Image:
        """Let ``reference`` name the stored image ``image_id``; that image."""
        self._names[reference] = image_id
        self._pulled[image_id] = time.time_ns()
        self._save()
        image = self._image(image_id)
        if image is None:  # removed by a concurrent RemoveImage
            raise ImageError(f"image {reference!r} was removed while it was being pulled")
        return image

    def remove(self, reference: str) -> Image | None:
        """Remove the image ``reference`` names with all its names; None if absent."""
        image = self.lookup(reference)
        if image is None:
            if self._names.pop(reference, None) is not None:
                self._save()
            return None
        for name in image.names:
            self._names.pop(name, None)
        self._pulled.pop(image.id, None)
        self._save()
        with contextlib.suppress(FileNotFoundError):
            image.path.unlink()
        return image

    # --- the index ---------------------------------------------------------

    def _image(self, image_id: str) -> Image | None:
        hexdigest = image_id.removeprefix("sha256:")
        if len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
            return None
        path = self.blobs / hexdigest
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        names = tuple(sorted(n for n, i in self._names.items() if i == image_id))
        return Image(image_id, size, path, names, self._pulled.get(image_id, 0))

    def _load(self) -> None:
        try:
            data = json.loads(self._index_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ImageError(f"image index {self._index_path} is unreadable: {exc}") from exc
        self._names = {str(k): str(v) for k, v in data.get("names", {}).items()}
        self._pulled = {str(k): int(v) for k, v in data.get("pulled", {}).items()}

    def _save(self) -> None:
        data = json.dumps({"names": self._names, "pulled": self._pulled}, indent=1, sort_keys=True)
        handle, tmp = tempfile.mkstemp(dir=self.root, prefix=".index-")
        try:
            with os.fdopen(handle, "w") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self._index_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
