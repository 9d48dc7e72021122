"""The instructions scenario: callgrind instruction counts per message.

No test asserts a duration. The counts are checked as a plausible bound (a Kombu
memory publish is between 50k and 500k instructions), as repeatable (two cells of
the same target within 1%), and as sensitive: a ``sitecustomize.py`` on the
probe's ``PYTHONPATH`` (the probe inherits the caller's environment) that makes
``kombu.messaging.Producer.publish`` do ~25% more work raises the figure >= 20%.
"""
import os
import subprocess
import sys
import textwrap

import psutil
import pytest

from bench import callgrind_child, runner, scenarios
from bench.scenarios import instructions
from support import cells, run_cell

KEYS = {"target", "payload_bytes", "serializer"}
KOMBU = {"target": "kombu-publish", "payload_bytes": 112, "serializer": "json"}
HAVE_VALGRIND = instructions.valgrind_path() is not None
needs_valgrind = pytest.mark.skipif(not HAVE_VALGRIND, reason=instructions.NOT_INSTALLED)


def options(workdir, **kw) -> runner.RunOptions:
    kw.setdefault("timeout", 120.0)
    return runner.RunOptions(scenarios=("instructions",), workdir=workdir, **kw)


def valgrind_children() -> list:
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "valgrind" in " ".join(p.cmdline()) or "bench.callgrind_child" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


# --------------------------------------------------------------------------- no valgrind needed
def test_registered_opt_in_without_services(tmp_path):
    assert "instructions" in scenarios.names()
    cls = scenarios.get("instructions")
    assert cls.opt_in is True
    found = cells("instructions", options(tmp_path))
    assert {c["target"] for c in found} == set(instructions.SIZES) == set(callgrind_child.TARGETS)
    assert all(set(c) == KEYS for c in found)
    assert {c["serializer"] for c in found if c["target"] in ("queue-put", "recorder")} == {"-"}
    assert cls(options(tmp_path)).requires(KOMBU) == set()


def test_serializers_and_payload_from_options(tmp_path):
    found = cells("instructions", options(tmp_path, serializers=("json", "pickle"),
                                          payload_bytes=1000))
    kombu = [c for c in found if c["target"] == "kombu-publish"]
    assert {c["serializer"] for c in kombu} == {"json", "pickle"}
    assert {c["payload_bytes"] for c in found} == {1000}


def test_skipped_with_how_to_install_when_valgrind_is_missing(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    c = run_cell("instructions", KOMBU, options(tmp_path))
    assert c.status == "skipped"
    assert c.reason == "valgrind not installed: apt-get install valgrind (Debian package valgrind)"


def test_probe_body_is_the_publish_scenarios():
    for n in (0, 5, 112, 4096):
        assert callgrind_child.make_payload(n) == scenarios.make_payload(n)


def test_every_target_runs_without_valgrind():
    """The probe itself (plain Python, a few hundred messages per target)."""
    env = instructions.child_env()
    for target in callgrind_child.TARGETS:
        argv = instructions.probe_argv(target, 2 * callgrind_child.CHUNK, 112, "json")
        done = subprocess.run(argv, cwd=instructions.ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, (target, done.stderr[-2000:])
        assert done.stdout == ""


def test_argv_has_the_same_length_for_both_totals():
    a = instructions.probe_argv("kombu-publish", 100, 112, "json")
    b = instructions.probe_argv("kombu-publish", 2100, 112, "json")
    assert [len(x) for x in a] == [len(x) for x in b]


def test_unix_message_is_what_the_unix_channel_frames():
    from transports.framing import decode_message, encode_message

    message = callgrind_child.unix_message(callgrind_child.make_payload(112))
    assert set(message) == {"body", "content-encoding", "content-type", "headers",
                            "properties"}
    assert message["properties"]["delivery_info"] == {
        "exchange": callgrind_child.QUEUE, "routing_key": callgrind_child.QUEUE}
    assert decode_message(encode_message(message)) == message


def test_callgrind_total_from_out_file_or_stderr(tmp_path):
    out = tmp_path / "cg.out"
    out.write_text("# callgrind format\nevents: Ir\nsummary: 123\nfn=x\n0 5\ntotals: 456\n")
    assert instructions.callgrind_total(out) == 456
    out.write_text("events: Ir\nsummary: 789\n")
    assert instructions.callgrind_total(out) == 789
    missing = tmp_path / "none.out"
    assert instructions.callgrind_total(missing, "==1== Collected : 1,234\n==1== \n") == 1234
    with pytest.raises(instructions.ProbeFailed):
        instructions.callgrind_total(missing, "")


def test_a_failing_probe_fails_the_cell_with_its_last_stderr_line(tmp_path):
    c = run_cell("instructions", dict(KOMBU, serializer="no-such-serializer"),
                 options(tmp_path))
    assert c.status == "failed"
    assert "probe exited 1" in c.reason and "no-such-serializer" in c.reason, c.reason
    assert not valgrind_children()


# --------------------------------------------------------------------------- under valgrind
@needs_valgrind
@pytest.mark.slow
def test_a_probe_over_its_timeout_is_stopped(tmp_path):
    c = run_cell("instructions", KOMBU, options(tmp_path, timeout=2.0))
    assert c.status == "failed"
    assert "took longer than 2 s" in c.reason, c.reason
    assert not valgrind_children()


@pytest.fixture(scope="module")
def kombu_twice(tmp_path_factory):
    """The kombu-publish cell measured in two rounds (two pairs of callgrind runs)."""
    if not HAVE_VALGRIND:
        pytest.skip(instructions.NOT_INSTALLED)
    return run_cell("instructions", KOMBU, options(tmp_path_factory.mktemp("kombu")),
                    rounds=2)


@pytest.mark.slow
def test_kombu_publish_is_counted_and_plausible(kombu_twice):
    c = kombu_twice
    assert c.status == "ok", c.reason
    for rep in c.repeats:
        m = rep["metrics"]
        assert 50_000 < m["instructions_per_msg"] < 500_000, m
        assert m["messages"] == m["n2"] - m["n1"] == instructions.SIZES["kombu-publish"].messages
        assert m["instructions_n2"] > m["instructions_n1"] > 0
        assert m["valgrind"].startswith("valgrind")


@pytest.mark.slow
def test_kombu_publish_repeats_within_one_percent(kombu_twice):
    a, b = (rep["metrics"]["instructions_per_msg"] for rep in kombu_twice.repeats)
    assert abs(a - b) / min(a, b) < 0.01, (a, b)


# The same work per iteration whatever n is (no int above the small-int cache is made:
# ``range`` and ``x += 1`` past 256 would allocate, and calibrating at one n would not hold
# at another).
BUSY = '''
from itertools import repeat

def busy(n):
    x = 0
    for _ in repeat(None, n):
        x = (x + 1) & 127
    return x
'''


def busy_loop_cost(tmp_path) -> float:
    """Instructions per iteration of :data:`BUSY`'s loop on this Python, by callgrind."""
    code = BUSY + "import sys\nfor _ in range(100):\n    busy(int(sys.argv[1]))\n"
    argvs = [[sys.executable, "-c", code, f"{n:05d}"] for n in (0, 1000)]
    i0, i1 = instructions.count_pair(instructions.valgrind_path(), argvs,
                                     instructions.child_env(), 120.0, tmp_path)
    return (i1 - i0) / 100_000


@pytest.mark.slow
def test_a_slower_publish_is_seen(kombu_twice, tmp_path, monkeypatch):
    base = kombu_twice.metrics["instructions_per_msg"]
    iterations = round(0.25 * base / busy_loop_cost(tmp_path))
    site = tmp_path / "slow"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BUSY + textwrap.dedent(f"""
        import functools
        import kombu.messaging

        _publish = kombu.messaging.Producer.publish

        @functools.wraps(_publish)
        def publish(self, *args, **kwargs):
            busy({iterations})
            return _publish(self, *args, **kwargs)

        kombu.messaging.Producer.publish = publish
        """))
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(site) + (os.pathsep + path if path else ""))
    c = run_cell("instructions", KOMBU, options(tmp_path))
    assert c.status == "ok", c.reason
    ratio = c.metrics["instructions_per_msg"] / base
    assert 1.20 <= ratio < 1.40, (base, c.metrics["instructions_per_msg"], iterations)
