"""Raw ``queue.Queue``: the ceiling. No serializer, no transport, one process.

A message is the tuple ``(i, t, payload)``; the consumer drains it in this
process after publishing (there is nothing another process could reach).
"""
from __future__ import annotations

import queue
from contextlib import contextmanager


class Publisher:
    api = "queue"
    cross_process = False

    def __init__(self, payload: str):
        self.payload = payload
        self.queue = None

    def open(self) -> None:
        self.queue = queue.Queue()

    @contextmanager
    def sending(self):
        """Yields ``send(i, t)``: put one message carrying ``i`` and ``t``."""
        put, body = self.queue.put, self.payload

        def send(i, t):
            put((i, t, body))
        yield send

    def drain(self, tally, until=None, timeout: float = 0.0) -> None:
        get = self.queue.get_nowait
        add = tally.add
        while True:
            try:
                i, t, _ = get()
            except queue.Empty:
                return
            add(i, t, 0)

    def close(self) -> None:
        self.queue = None
