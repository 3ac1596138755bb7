"""What the CRI reports about a container and the backend does not keep.

A container's image (as named and as an id), its CRI mounts and stop signal
are part of its ContainerStatus. They are kept in ``ROOT/cri.db`` (SQLite,
WAL) beside the backend's own state, with a cache in memory; a record is
written at CreateContainer and dropped at RemoveContainer/RemovePodSandbox.
Called from the trio thread only.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any


class Records:
    """Container id → a small JSON-able record."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS records (id TEXT PRIMARY KEY, data TEXT)")
        rows = self._db.execute("SELECT id, data FROM records")
        self._items: dict[str, dict[str, Any]] = {key: json.loads(data) for key, data in rows}

    def get(self, container_id: str) -> dict[str, Any]:
        """The record of ``container_id``; empty if there is none."""
        return self._items.get(container_id, {})

    def put(self, container_id: str, value: dict[str, Any]) -> None:
        self._items[container_id] = value
        self._db.execute(
            "INSERT OR REPLACE INTO records (id, data) VALUES (?, ?)",
            (container_id, json.dumps(value)),
        )

    def drop(self, container_ids: list[str]) -> None:
        gone = [(c,) for c in container_ids if self._items.pop(c, None) is not None]
        if gone:
            self._db.executemany("DELETE FROM records WHERE id = ?", gone)

    def close(self) -> None:
        self._db.close()
