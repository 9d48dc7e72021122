"""The fifo transport's shared bindings: the consumer of a queue writes that queue's
named-exchange bindings to ``<dir>/.bindings/<queue>.json`` (0600, replaced atomically),
so a publisher that never declared them still routes; :meth:`SharedBindings.table` reads
every such file, cached until the folder changes."""
from __future__ import annotations

import json
import os
import time

BIND_DIR = ".bindings"


class SharedBindings:
    """The ``.bindings`` folder of one fifo directory."""

    def __init__(self, directory: str, filename):
        self.folder = os.path.join(directory, BIND_DIR)
        self._filename = filename    # queue -> its safe file name (fifo.queue_filename)
        self._cache = None           # (folder mtime, table)

    def path(self, queue: str) -> str:
        return os.path.join(self.folder, self._filename(queue) + ".json")

    def write(self, queue: str, rows: list) -> None:
        """Publish ``rows`` ([exchange, type, routing key, pattern, queue]); none: remove."""
        path = self.path(queue)
        if not rows:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
                  "w") as fh:
            json.dump(rows, fh)
        os.replace(tmp, path)

    def table(self) -> dict:
        """{exchange: (type, [(routing_key, pattern, queue)])} of attached consumers."""
        try:
            mtime = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return {}
        cached = self._cache
        # A folder changed within the last 0.2 s may change again inside one mtime tick.
        if cached is not None and cached[0] == mtime and time.time_ns() - mtime > 200_000_000:
            return cached[1]
        table = {}
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            names = []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.folder, name)) as fh:
                    rows = json.load(fh)
                for exchange, etype, rkey, pattern, queue in rows:
                    table.setdefault(exchange, (etype, []))[1].append((rkey, pattern, queue))
            except (OSError, ValueError, TypeError):
                continue  # vanished or half-written by another version: skip it
        self._cache = (mtime, table)
        return table
