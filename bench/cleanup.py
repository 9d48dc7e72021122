"""What a cell leaves on a broker after its measurement: its queues, deleted."""
from __future__ import annotations


def delete_queues(env, names) -> None:
    """Delete a cell's queues and their same-named exchanges (unique names, so ours)."""
    from kombu import Exchange, Queue
    from kombu.transport import virtual

    if not names:
        return
    try:
        with env.connection(connect_timeout=3) as conn:
            channel = conn.channel()
            # A virtual transport (redis...) deletes only the bindings its channel has
            # declared, so declare there first; a server (amqp) knows its own.
            redeclare = isinstance(conn.transport, virtual.Transport)
            for name in names:
                queue = Queue(name, Exchange(name), name, channel=channel)
                if redeclare:
                    queue.declare()
                queue.delete()
                Exchange(name, channel=channel).delete()
    except Exception:  # cleanup is best effort; the measurement is already made
        pass
