"""Durable state of the service in SQLite (stdlib sqlite3, WAL).

Pods, containers (their config with the description text, their state and
exit results, and what is needed to find their processes again: pid, its
start time, process group, cgroup) and stray processes adopted by the
subreaper. Each change is one short transaction, so a SIGKILL of the
supervisor leaves the last committed state, never a corrupted one (WAL,
``synchronous=NORMAL``: a committed transaction survives a crash of the
process; only a power loss may lose the last ones).

A :class:`StateStore` also holds an exclusive ``flock`` on ``LOCK`` in the
state directory for its lifetime: two supervisors never share one state.
Rows are JSON documents; the service owns their meaning.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CapvisorError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pods (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY, pod_id TEXT NOT NULL, seq INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reports (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS strays (
    pid INTEGER PRIMARY KEY, start_time INTEGER NOT NULL);
"""


class StateError(CapvisorError):
    """The state directory cannot be used (locked by another supervisor, unreadable)."""


class StateStore:
    """The SQLite file ``state.db`` in ``directory`` (created 0700 if missing)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock = os.open(
                self.directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise StateError(f"state directory {self.directory}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock)
            raise StateError(
                f"state directory {self.directory} is in use by another capvisor supervisor"
            ) from exc
        try:
            self._db = sqlite3.connect(
                self.directory / "state.db", isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            (self._seq,) = self._db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM"
                " (SELECT seq FROM pods UNION ALL SELECT seq FROM containers)"
            ).fetchone()
        except sqlite3.Error as exc:
            os.close(self._lock)
            raise StateError(f"state database in {self.directory}: {exc}") from exc

    def close(self) -> None:
        """Close the database and release the lock."""
        self._db.close()
        os.close(self._lock)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several writes into one commit."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _next_seq(self) -> int:
        self._seq += 1
        return int(self._seq)

    # --- meta -------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # --- pods and containers ----------------------------------------------

    def put_pod(self, pod_id: str, data: dict[str, Any]) -> None:
        """Insert or replace the pod ``pod_id``."""
        self._db.execute(
            "INSERT INTO pods VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET data = excluded.data",
            (pod_id, self._next_seq(), json.dumps(data)),
        )

    def delete_pod(self, pod_id: str) -> None:
        self._db.execute("DELETE FROM pods WHERE id = ?", (pod_id,))

    def pods(self) -> list[tuple[str, dict[str, Any]]]:
        """Every pod as (id, data), oldest first."""
        rows = self._db.execute("SELECT id, data FROM pods ORDER BY seq").fetchall()
        return [(row[0], json.loads(row[1])) for row in rows]

    def put_container(self, container_id: str, pod_id: str, data: dict[str, Any]) -> None:
        """Insert or replace the container ``container_id``."""
        self._db.execute(
            "INSERT INTO containers VALUES (?, ?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET data = excluded.data",
            (container_id, pod_id, self._next_seq(), json.dumps(data)),
        )

    def delete_container(self, container_id: str) -> None:
        self._db.execute("DELETE FROM containers WHERE id = ?", (container_id,))
        self._db.execute("DELETE FROM reports WHERE id = ?", (container_id,))

    def put_report(self, container_id: str, report: dict[str, Any]) -> None:
        """The confinement report of the container's last start (kept out of memory)."""
        self._db.execute(
            "INSERT OR REPLACE INTO reports VALUES (?, ?)", (container_id, json.dumps(report))
        )

    def report(self, container_id: str) -> dict[str, Any]:
        row = self._db.execute("SELECT data FROM reports WHERE id = ?", (container_id,)).fetchone()
        return {} if row is None else dict(json.loads(row[0]))

    def containers(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Every container as (id, pod id, data), oldest first."""
        rows = self._db.execute("SELECT id, pod_id, data FROM containers ORDER BY seq").fetchall()
        return [(row[0], row[1], json.loads(row[2])) for row in rows]

    # --- strays -----------------------------------------------------------

    def add_stray(self, pid: int, start_time: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO strays VALUES (?, ?)", (pid, start_time))

    def remove_stray(self, pid: int) -> None:
        self._db.execute("DELETE FROM strays WHERE pid = ?", (pid,))

    def strays(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in self._db.execute("SELECT pid, start_time FROM strays")]
