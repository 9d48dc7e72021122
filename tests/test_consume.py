"""The consume scenario against real brokers: every message drained and counted.

No test asserts a rate or a duration: the ratio aims live in results/baselines/gates.toml.
"""
from contextlib import closing

import psutil
import pytest

from bench import brokers, runner
from bench.scenarios import consume
from support import cells, run_cell, scenario

KEYS = {"transport", "serializer", "payload_bytes", "ack"}
TRANSPORTS = ("memory", "unix", "fifo", "redis", "amqp")


def cell(transport="memory", ack="yes") -> dict:
    return {"transport": transport, "serializer": "json", "payload_bytes": 112, "ack": ack}


def options(tmp_path, **kw) -> runner.RunOptions:
    kw.setdefault("messages", 2_000)
    kw.setdefault("timeout", 60.0)
    kw.setdefault("repeat", 1)
    return runner.RunOptions(quick=True, workdir=tmp_path, **kw)


def children() -> list:
    return [p for p in psutil.Process().children(recursive=True)
            if "bench.drivers" in " ".join(p.cmdline())]


def assert_drained(c) -> None:
    m = c.metrics
    assert c.status == "ok", c.reason
    assert m["sent"] == 2_000
    assert m["received"] == m["sent"]
    assert m["lost"] == 0 and m["duplicates"] == 0, c.reason
    assert m["consume_per_s"] > 0
    assert c.histograms["gap"]["count"] == m["received"] - 1


def test_the_matrix_puts_memory_first_and_covers_every_transport():
    quick = cells("consume", runner.RunOptions(quick=True))
    full = cells("consume", runner.RunOptions(quick=False))
    assert all(set(c) == KEYS for c in quick + full)
    assert quick[0]["transport"] == "memory" and full[0]["transport"] == "memory"
    assert {c["transport"] for c in quick} == set(TRANSPORTS)
    assert {c["transport"] for c in full} == set(brokers.names())
    assert {c["ack"] for c in full} == {"yes", "no"}
    assert all(c in full for c in quick)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_each_transport_drains_every_message(transport, need, tmp_path):
    info = brokers.info(transport)
    if info.service:
        need(info.service)
    opts = options(tmp_path)
    with closing(scenario("consume", opts)) as sc:
        if transport != "memory":  # x_memory is against this round's memory cell
            runner.run_cell(sc, cell("memory"))
        c = runner.run_cell(sc, cell(transport))
    assert_drained(c)
    assert c.metrics["x_memory"] > 0
    if info.holds_backlog:
        assert c.metrics["load"] == "prefilled"
    else:
        assert c.metrics["load"] == "fed"
        assert consume.FED_NOTE in c.reason
    assert children() == []


@pytest.mark.parametrize("transport", ("memory", "fifo"))
def test_no_ack_drains_every_message(transport, tmp_path):
    assert_drained(run_cell("consume", cell(transport, ack="no"), options(tmp_path)))
    assert children() == []


def test_backlog_limit_caps_the_filesystem_cell():
    fs = brokers.info("filesystem")
    assert fs.max_backlog and consume._count(fs, runner.RunOptions()) == fs.max_backlog
    assert consume._count(brokers.info("memory"), runner.RunOptions()) == \
        consume.FULL.embedded


def test_a_paced_feed_measures_latency_from_the_intended_time(tmp_path):
    opts = options(tmp_path, rate_sweep=(400.0,), duration=0.5)
    rated = cells("consume", opts)
    assert rated and all(c["rate"] == 400.0 for c in rated)
    assert "memory" not in {c["transport"] for c in rated}   # in-process: nothing feeds it
    c = run_cell("consume", cell("unix") | {"rate": 400.0}, opts)
    assert c.status == "ok", c.reason
    m = c.metrics
    assert m["sent"] == 200 and m["received"] == 200 and m["lost"] == 0
    assert m["load"] == "paced" and m["backlog_growth_per_s"] is not None
    assert c.histograms["from_intended"]["count"] == 200
    assert children() == []
