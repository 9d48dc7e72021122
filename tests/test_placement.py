"""--cpus: what it accepts, what it refuses (one line each), pinning this process, and
the machine's busy share between two /proc/stat readings."""
import os

import pytest

from bench import placement


def test_roles_and_cpu_lists():
    cpus = sorted(os.sched_getaffinity(0))
    first = cpus[0]
    got = placement.parse_cpus(f"publisher={first},pool={first}-{first},worker={first}+{first}")
    assert got == {"publisher": (first,), "pool": (first,), "worker": (first,)}


@pytest.mark.parametrize("text, words", [
    ("publisher", "expected ROLE=CPUS"), ("gpu=0", "ROLE one of"),
    ("worker=0,worker=0", "given twice"), ("pool=1-0", "backwards"),
    ("pool=x", "CPUS is a number"), ("pool=100000", "not available here"), ("", "no ROLE")])
def test_bad_values_say_what_to_write(text, words):
    with pytest.raises(ValueError, match=words):
        placement.parse_cpus(text)


def test_pinning_this_process_and_saying_so():
    before = os.sched_getaffinity(0)
    one = min(before)
    p = placement.Placement({"publisher": (one,)})
    try:
        p.pin("publisher", [os.getpid()])
        assert os.sched_getaffinity(0) == {one}
        text = p.record(shared_broker=True)
        assert f"publisher={one}" in text and "broker=not pinned (a shared service)" in text
        assert "worker=any" in text
    finally:
        os.sched_setaffinity(0, before)
    assert "publisher=any (" in placement.Placement({}).record(shared_broker=False)


def test_cpu_sample_shares():
    a = placement.CpuSample()
    sum(range(200_000))
    out = placement.CpuSample().since(a)
    assert set(out) <= {"cpu_busy_pct"}
    if out:
        assert 0 <= out["cpu_busy_pct"] <= 100
