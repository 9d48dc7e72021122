"""bench.locust.clocks without Locust: which exchange the estimate in use comes from, and the
series the results carry. (Not importing locust here: it would monkey-patch pytest.)"""
from types import SimpleNamespace

from bench.locust import clocks

MS = 1_000_000


class Runner:
    """What Clocks needs of Locust's MasterRunner: its clients and send_message."""

    def __init__(self, ids):
        self.clients = SimpleNamespace(all=[SimpleNamespace(id=i, state="running") for i in ids])
        self.sent = []

    def send_message(self, kind, data, client_id=None):
        self.sent.append((kind, data, client_id))


def exchange(c: clocks.Clocks, cid, seq, t1, rtt, offset, boot="b1"):
    """An answered ping: sent at ``t1`` (master clock), back ``rtt`` later, the generator's
    clock ``offset`` ahead, both legs equal."""
    c._answers[(cid, seq)] = (t1, t1 + rtt // 2 + offset, t1 + rtt, boot)


def test_a_short_old_exchange_is_kept_until_its_age_costs_more_than_a_fresh_long_one(
        monkeypatch):
    now = 100_000 * MS
    monkeypatch.setattr(clocks.time, "time_ns", lambda: now)
    c, runner = clocks.Clocks(), Runner(["g"])
    exchange(c, "g", 1, now - 5_000 * MS, rtt=200_000, offset=3 * MS)    # 5 s old, 0.1 ms
    exchange(c, "g", 2, now - 10 * MS, rtt=2 * MS, offset=int(3.4 * MS))  # fresh, 1 ms
    c._update(runner, "master", since_ns=0)
    est = c.estimates["g"]
    # 0.1 ms + 5 s x 100 ppm = 0.6 ms < 1 ms: the old exchange stays in use (its age counts
    # from its answer's arrival)
    age_ns = 5_000 * MS - 200_000
    assert est.offset_ns == 3 * MS and est.uncertainty_ns == 100_000 + age_ns // 10_000
    assert runner.sent == [(clocks.TABLE, {"master": 0, "b1": 3 * MS}, "g")]
    # 10 s on, the old one costs 1.1 ms: a fresh 0.8 ms exchange takes over
    now += 5_000 * MS
    exchange(c, "g", 3, now - 10 * MS, rtt=int(1.6 * MS), offset=int(3.2 * MS))
    c._update(runner, "master", since_ns=now - 1_000 * MS)
    assert est.offset_ns == int(3.2 * MS) and est.uncertainty_ns == 800_000 + 840
    d = est.to_dict()
    assert [pt["offset_ms"] for pt in d["clock_series"]] == [3.0, 3.2]
    assert d["clock_series"][1]["burst_offset_ms"] == 3.2 and d["clock_exchanges"] == 3
    assert d["clock_offset_ms"] == 3.2 and d["clock_uncertainty_ms"] == 0.801


def test_exchanges_older_than_the_window_are_dropped_and_a_silent_generator_keeps_its_estimate(
        monkeypatch):
    now = 100_000 * MS
    monkeypatch.setattr(clocks.time, "time_ns", lambda: now)
    c, runner = clocks.Clocks(), Runner(["g", "h"])
    exchange(c, "g", 1, now - 1 * MS, rtt=200_000, offset=MS)
    exchange(c, "h", 2, now - 1 * MS, rtt=200_000, offset=-MS, boot="b2")
    c._update(runner, "master", since_ns=0)
    now += int((clocks.WINDOW_S + 1) * 1e9)
    exchange(c, "g", 3, now - 1 * MS, rtt=4 * MS, offset=2 * MS)
    c._update(runner, "master", since_ns=now - 2_000 * MS)
    assert c.estimates["g"].offset_ns == 2 * MS          # the short one is out of the window
    assert len(c.estimates["h"].series) == 1 and c.estimates["h"].offset_ns == -MS
    assert all((k[1] == 3) for k in c._answers)          # memory stays bounded
    assert runner.sent[-1][1] == {"master": 0, "b1": 2 * MS, "b2": -MS}
