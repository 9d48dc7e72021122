"""The open-loop pacer with a fake clock: no real time passes in these tests."""
import pytest

from bench.pacing import SPIN_NS, Pacer, achieved


class FakeClock:
    """Each reading advances ``tick`` ns (a spinning loop must see time move);
    ``sleep`` jumps ahead and is logged."""

    def __init__(self, start=1_000_000_000, tick=1_000):
        self.now = start
        self.tick = tick
        self.sleeps = []

    def __call__(self):
        self.now += self.tick
        return self.now

    def sleep(self, seconds):
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += int(seconds * 1e9)


def test_intended_times_follow_the_schedule_without_drift():
    p = Pacer(3.0, clock=FakeClock())
    t0 = p.start(0)
    assert t0 == 0
    assert [p.intended(i) for i in range(4)] == [0, 333_333_333, 666_666_666, 1_000_000_000]
    # computed from i, not accumulated: no drift after a million periods
    assert p.intended(3_000_000) == 1_000_000 * 1_000_000_000


def test_wait_blocks_until_due_and_returns_the_intended_time():
    clock = FakeClock()
    p = Pacer(100.0, clock=clock, sleep=clock.sleep)     # every 10 ms
    t0 = p.start()
    for i in range(1, 6):
        due = p.wait(i)
        assert due == t0 + i * 10_000_000
        assert clock.now >= due                            # never early
        assert clock.now - due <= clock.tick               # spins the last stretch
    # it slept for the bulk of each period, leaving SPIN_NS to spin
    assert len(clock.sleeps) == 5
    assert all(abs(s - (10_000_000 - SPIN_NS) / 1e9) < 1e-4 for s in clock.sleeps)


def test_a_late_sender_does_not_wait_and_keeps_the_schedule():
    clock = FakeClock()
    p = Pacer(1000.0, clock=clock, sleep=clock.sleep)    # every 1 ms
    t0 = p.start()
    clock.now += 50_000_000                               # stalled for 50 ms
    before = len(clock.sleeps)
    for i in range(1, 40):
        assert p.wait(i) == t0 + i * 1_000_000            # intended, not actual, time
    assert len(clock.sleeps) == before                    # caught up without sleeping
    lag = clock.now - p.intended(39)
    assert lag > 10_000_000                               # the lateness is visible to the caller


def test_short_waits_spin_without_sleeping():
    clock = FakeClock(tick=10)
    p = Pacer(1e6 / 100, clock=clock, sleep=clock.sleep)  # every 100 us < SPIN_NS
    t0 = p.start()
    assert p.wait(1) == t0 + 100_000
    assert clock.sleeps == []


@pytest.mark.parametrize("rate", [0, -1, None])
def test_rate_must_be_positive(rate):
    with pytest.raises(ValueError, match="rate must be a positive"):
        Pacer(rate)


def test_achieved():
    assert achieved(100.0, 1000, 10.0) == {
        "rate_target_per_s": 100.0, "rate_achieved_per_s": 100.0, "rate_shortfall": False}
    short = achieved(100.0, 900, 10.0)
    assert short["rate_achieved_per_s"] == 90.0 and short["rate_shortfall"] is True
    assert achieved(100.0, 960, 10.0)["rate_shortfall"] is False    # within 5%
    assert achieved(100.0, 0, 0.0)["rate_achieved_per_s"] == 0.0


def test_shift_moves_the_whole_schedule_later():
    """A pause the harness takes itself (an in-process drain) is not lateness."""
    from bench.pacing import Pacer

    pacer = Pacer(1000.0, clock=lambda: 0, sleep=lambda s: None)
    pacer.start(t0=0)
    before = pacer.intended(10)
    pacer.shift(5_000_000)
    assert pacer.intended(10) == before + 5_000_000
