"""The web UI's class picker ticks (bench.locust.webui.ticked), without Locust: the classes
named on the command line, all when none is, less those the transport cannot run."""
from types import SimpleNamespace

from bench.locust import webui


class Publisher:
    runs_tasks = False


class RoundTrip:
    runs_tasks = True


def _env(transport, named=(), app=""):
    classes = {"Publisher": Publisher, "RoundTrip": RoundTrip}
    return SimpleNamespace(user_classes=[classes[n] for n in named],
                           available_user_classes=classes,
                           parsed_options=SimpleNamespace(transport=transport, app=app))


def test_named_classes_are_ticked_less_those_the_transport_cannot_run():
    assert webui.ticked(_env("unix", ["RoundTrip"])) == ["RoundTrip"]
    assert webui.ticked(_env("memory", ["Publisher", "RoundTrip"])) == ["Publisher"]
    assert webui.ticked(_env("unix")) == ["Publisher", "RoundTrip"]
    assert webui.ticked(_env("memory")) == ["Publisher"]
    assert webui.ticked(_env("memory", ["RoundTrip"], app="proj:app")) == ["RoundTrip"]


def test_the_snapshot_is_read_once_per_period_and_cleared_on_demand():
    now, reads = [0.0], []
    snap = webui.Snapshot(lambda: reads.append(1) or {"rows": len(reads)}, 1.0,
                          clock=lambda: now[0])
    assert snap()["rows"] == 1 and snap()["rows"] == 1
    now[0] = 1.5
    assert snap()["rows"] == 2
    snap.clear()
    assert snap()["rows"] == 3 and snap()["taken"] == 1.5
