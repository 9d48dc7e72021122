"""Publisher confirms on the unix transport (``confirm_publish=True``): a publish
returns only once the broker holds the message, so one that returned is never
lost short of the broker's own death. Real broker processes, SIGSTOP and SIGKILL.

Also a measurement, not a test: ``python tests/test_broker_confirm.py [ROUNDS] [N]``
prints the Kombu held-producer publish rate with confirms and without, measured in
interleaved rounds in one process (medians and the per-round ratio)."""
from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer, Queue

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transports  # noqa: E402,F401  registers the unix alias
from transports import broker as unix_broker  # noqa: E402
from transports import unix  # noqa: E402
from support import qname, wait_until  # noqa: E402

WAIT_S = 30.0  # generous bound for what takes milliseconds
BODY = {"data": "x" * 100}  # the bench's 112-byte JSON body


@pytest.fixture
def broker():
    folder = Path(tempfile.mkdtemp(prefix="cbc-"))
    b = unix_broker.start(str(folder / "b.sock"), log_path=folder / "b.log")
    yield b
    b.kill()
    shutil.rmtree(folder, ignore_errors=True)


def direct() -> Queue:
    name = qname("confirm")
    return Queue(name, Exchange(name, "direct"), routing_key=name)


def test_a_confirmed_publish_waits_for_the_broker(broker):
    q = direct()
    confirm = Connection(broker.url, transport_options={"confirm_publish": True,
                                                        "publish_timeout": WAIT_S})
    plain = Connection(broker.url)
    outcome = {}
    try:
        confirmed, pipelined = Producer(confirm), Producer(plain)
        confirmed.publish(BODY, exchange=q.exchange, routing_key=q.routing_key, declare=[q])
        pipelined.publish(BODY, exchange=q.exchange, routing_key=q.routing_key)
        os.kill(broker.pid, signal.SIGSTOP)
        # Pipelined: handed to the kernel, it returns though the broker holds nothing.
        pipelined.publish(BODY, exchange=q.exchange, routing_key=q.routing_key)

        def publish():
            try:
                confirmed.publish(BODY, exchange=q.exchange, routing_key=q.routing_key)
                outcome["returned"] = True
            except Exception as exc:  # judged below
                outcome["error"] = exc
        thread = threading.Thread(target=publish)
        thread.start()
        thread.join(1.0)
        assert not outcome, "a confirmed publish returned while the broker was stopped"
        os.kill(broker.pid, signal.SIGKILL)
        thread.join(WAIT_S)
    finally:
        try:
            os.kill(broker.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        confirm.release()
        plain.release()
    assert "returned" not in outcome
    assert isinstance(outcome.get("error"), unix.BrokerConnectionError)


def test_every_confirmed_publish_is_held_until_the_broker_dies(broker):
    """At any moment the broker holds at least every publish that has returned; killed,
    it makes the publish in flight fail instead of returning."""
    q = direct()
    confirmed = [0]
    errors = []
    stop = threading.Event()

    def produce():
        with Connection(broker.url, transport_options={"confirm_publish": True,
                                                       "publish_timeout": WAIT_S}) as conn:
            producer = Producer(conn)
            i = 0
            try:
                while not stop.is_set():
                    producer.publish({"i": i}, exchange=q.exchange, routing_key=q.routing_key)
                    i += 1
                    confirmed[0] = i
            except Exception as exc:  # judged below
                errors.append(exc)

    with Connection(broker.url) as observer:
        bound = q(observer.default_channel)
        bound.declare()
        thread = threading.Thread(target=produce)
        thread.start()
        try:
            wait_until(lambda: confirmed[0] > 100, what="confirmed publishes")
            for _ in range(200):
                returned = confirmed[0]                      # read before the count
                held = bound.queue_declare(passive=True).message_count
                assert held >= returned, f"{returned} publishes returned, broker holds {held}"
            os.kill(broker.pid, signal.SIGKILL)
            thread.join(WAIT_S)
        finally:
            stop.set()
            thread.join(WAIT_S)
    assert not thread.is_alive()
    assert errors and isinstance(errors[0], unix.BrokerConnectionError)
    assert "Traceback" not in broker.log_tail(100)


def test_a_confirmed_batch_is_held_when_it_ends(broker):
    q = direct()
    with Connection(broker.url, transport_options={"confirm_publish": True}) as conn, \
            Connection(broker.url) as observer:
        producer = Producer(conn)
        producer.maybe_declare(q)
        with producer.batch(50):
            for i in range(120):
                producer.publish({"i": i}, exchange=q.exchange, routing_key=q.routing_key)
        # Another connection, no waiting: the batch returned only once all were held.
        assert q(observer.default_channel).queue_declare(passive=True).message_count == 120


# -- measurement ------------------------------------------------------------------------

def measure(rounds: int = 7, n: int = 20_000) -> None:
    """Held-producer publish rate, confirm vs pipelined, interleaved rounds, one process.

    No consumer: each round's queue is purged after it, so both modes publish into an
    equally short queue. Also counts, for the pipelined mode, how often another
    connection saw fewer messages in the broker than publishes had returned.
    """
    folder = Path(tempfile.mkdtemp(prefix="cbm-"))
    b = unix_broker.start(str(folder / "b.sock"))
    try:
        modes = {"pipelined": {}, "confirm": {"confirm_publish": True}}
        conns = {m: Connection(b.url, transport_options=o) for m, o in modes.items()}
        rates = {m: [] for m in modes}
        q = direct()
        for r in range(rounds):
            for mode, conn in conns.items():
                producer = Producer(conn)
                producer.maybe_declare(q)
                for _ in range(500):  # warm-up
                    producer.publish(BODY, exchange=q.exchange, routing_key=q.routing_key)
                started = time.perf_counter()
                for _ in range(n):
                    producer.publish(BODY, exchange=q.exchange, routing_key=q.routing_key)
                rates[mode].append(n / (time.perf_counter() - started))
                q(conn.default_channel).purge()
        for mode, values in rates.items():
            print(f"{mode:10s} median {statistics.median(values):8.0f} msg/s  "
                  f"rounds {[round(v) for v in values]}")
        ratios = [c / p for c, p in zip(rates["confirm"], rates["pipelined"])]
        print(f"confirm / pipelined: median {statistics.median(ratios):.3f} "
              f"(rounds {[round(x, 3) for x in ratios]})")
        for conn in conns.values():
            conn.release()
    finally:
        b.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    measure(*args)
