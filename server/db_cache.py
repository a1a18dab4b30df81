"""RowCache: parsed rows kept in memory, coherent with the commits of one server.db.Db (one process)."""
from __future__ import annotations

import threading
from typing import Any, Callable


class RowCache:
    """Parsed rows of one table by key, kept coherent with the database so hot paths (every request of
    a round reads its round row) need no database read.

    A write invalidates its key at once (`invalidate`, inside the transaction) and the key stays
    uncached until the transaction ends (commit or rollback: Db.write calls `settle`). A read that
    overlapped any write or transaction end does not fill the cache, so it never holds a row older
    than the last commit. Rows handed out are shared: callers must not mutate them.

    Coherent with this process's commits only: a Db shared by several server processes (--cluster) hands out
    disabled caches (`enabled=False`: every get loads), since another process's commit cannot invalidate here.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._rows: dict[Any, Any] = {}
        self._dirty: set[Any] = set()
        self._gen = 0
        self._lock = threading.Lock()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        if not self.enabled:
            return load()
        row = self._rows.get(key)
        if row is not None:
            return row
        gen = self._gen
        row = load()
        if row is not None:
            with self._lock:
                if gen == self._gen and key not in self._dirty:
                    self._rows[key] = row
        return row

    def invalidate(self, key: Any) -> None:
        with self._lock:
            self._gen += 1
            self._dirty.add(key)
            self._rows.pop(key, None)

    def settle(self) -> None:
        with self._lock:
            self._gen += 1
            for key in self._dirty:
                self._rows.pop(key, None)
            self._dirty.clear()


__all__ = ["RowCache"]
