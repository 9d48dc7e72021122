"""The results schema: round trip, precise validation errors, masked passwords."""
import json

import pytest

from bench import recorder, results


def _run(secret_url=None):
    hist, overflow, *_ = recorder.histogram([10, 20, 30, 40, 5_000])
    cell = results.aggregate(
        "publish", {"api": "kombu", "transport": "memory"},
        [{"metrics": {"throughput_per_s": 1000.0, "sent": 5, "received": 5, "lost": 0},
          "histograms": {"publish_us": recorder.Recorded(hist, overflow, "us")}}])
    env = results.environment({"amqp": {"url": secret_url}} if secret_url else {})
    skipped = results.Cell("publish", {"api": "kombu", "transport": "redis"}, "skipped",
                           "redis unreachable")
    return results.Run(env, [cell, skipped])


def test_round_trip(tmp_path):
    run = _run()
    path = tmp_path / "r.json"
    results.dump(run, path)
    loaded = results.load(path)
    assert loaded.to_dict() == run.to_dict()
    assert [c.key for c in loaded.cells] == [
        "publish[api=kombu,transport=memory]", "publish[api=kombu,transport=redis]"]
    h = loaded.cells[0].histograms["publish_us"]
    assert h["count"] == 5 and h["unit"] == "us"
    assert results.decode(h).get_total_count() == 5
    assert loaded.find("publish", transport="redis")[0].status == "skipped"


def test_dump_is_atomic_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    results.dump(_run(), path)
    results.dump(_run(), path)
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def _valid():
    return _run().to_dict()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema="celery-bench/0"), "schema is 'celery-bench/0'"),
    (lambda d: d.pop("cells"), "missing top-level key 'cells'"),
    (lambda d: d.pop("environment"), "missing top-level key 'environment'"),
    (lambda d: d["cells"][0].pop("params"), "cell 0 lacks 'params'"),
    (lambda d: d["cells"][1].update(status="meh"), "cell 1 has status 'meh'"),
    (lambda d: d["cells"][0]["histograms"]["publish_us"].pop("hdr"),
     "cell 0 histogram 'publish_us' lacks 'hdr'"),
])
def test_validate_says_what_is_wrong(mutate, message):
    data = _valid()
    mutate(data)
    with pytest.raises(results.SchemaError) as err:
        results.validate(data)
    assert message in str(err.value)


def test_validate_rejects_non_object():
    with pytest.raises(results.SchemaError, match="JSON object"):
        results.validate([1, 2])


def test_load_rejects_garbage(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError):
        results.load(path)


def test_bad_status_is_refused_on_write():
    with pytest.raises(ValueError, match="bad cell status"):
        results.Cell("publish", {}, status="maybe").to_dict()


def test_passwords_never_reach_the_file(tmp_path):
    secret = "amqp://bench:s3cret-pw@127.0.0.1:5672//"
    run = _run(secret)
    run.cells[1].reason = secret
    run.cells[0].params["broker"] = "redis://:r3dis-pw@127.0.0.1:6379/0"
    path = tmp_path / "r.json"
    results.dump(run, path)
    text = path.read_text()
    assert "s3cret-pw" not in text and "r3dis-pw" not in text
    assert "amqp://bench:****@127.0.0.1:5672//" in text
    data = json.loads(text)
    assert data["environment"]["services"]["amqp"]["url"] == "amqp://bench:****@127.0.0.1:5672//"


def test_passwords_inside_longer_strings_are_masked():
    from bench.config import mask_secrets

    assert mask_secrets(["--amqp-url=amqp://u:pw@h//"]) == ["--amqp-url=amqp://u:****@h//"]
    assert mask_secrets({"reason": "redis at redis://:pw@h:1/0 refused"}) == \
        {"reason": "redis at redis://:****@h:1/0 refused"}
    assert mask_secrets("http://h/a:b@c") == "http://h/a:b@c"        # no userinfo: untouched
    assert mask_secrets("postgresql+psycopg2://postgres@h/db") == "postgresql+psycopg2://postgres@h/db"


def test_flags_and_error_counts_survive_repeats():
    """A shortfall flagged in one repeat stays flagged; consumer errors add up."""
    from bench import results

    reps = [{"metrics": {"rate_shortfall": False, "consumer_errors": 0}},
            {"metrics": {"rate_shortfall": True, "consumer_errors": 2}},
            {"metrics": {"rate_shortfall": False, "consumer_errors": 0}}]
    cell = results.aggregate("publish", {}, reps)
    assert cell.metrics["rate_shortfall"] is True
    assert cell.metrics["consumer_errors"] == 2
