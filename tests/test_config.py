"""Service URLs checked up front, secrets masked everywhere, JSON-only consumers.

In-process and fast, but for one run of ``list`` and one run whose every cell is skipped
at once; the CLI side of the same rules (bad inputs) is tests/test_bad_inputs.py.
"""
import json
import math
import os
import pickle

import pytest

from bench import config, options

SECRET = "s3cret"


# --------------------------------------------------------------------------- masking
@pytest.mark.parametrize("url, masked", [
    ("amqp://guest:guest@127.0.0.1:5672//", "amqp://guest:****@127.0.0.1:5672//"),
    ("redis://:s3cret@h:6379/0", "redis://:****@h:6379/0"),
    # unencoded characters in the password still mask
    ("amqp://u:pa/s3cret@host//", "amqp://u:****@host//"),
    ("amqp://u:p@s3cret@host//", "amqp://u:****@host//"),
    ("amqp://u:p?s3cret@host//", "amqp://u:****@host//"),
    ("amqp://u:p#s3cret@host//", "amqp://u:****@host//"),
    ("redis://u:s3c:ret@h/0", "redis://u:****@h/0"),
    ("postgresql://u:p@ss/s3cret@h:5432/db", "postgresql://u:****@h:5432/db"),
    # query strings: any case, any of the usual names
    ("redis://h:6379/0?password=s3cret&x=1", "redis://h:6379/0?password=****&x=1"),
    ("redis://h/0?PASSWORD=s3cret", "redis://h/0?PASSWORD=****"),
    ("amqp://h//?passwd=s3cret;pwd=s3cret", "amqp://h//?passwd=****;pwd=****"),
    ("amqp://h//?x=1&sasl_password=s3cret", "amqp://h//?x=1&sasl_password=****"),
    ("redis://h/0?secret=s3cret&token=s3cret&ssl_keyfile_password=s3cret",
     "redis://h/0?secret=****&token=****&ssl_keyfile_password=****"),
    ("sqs://h?aws_secret_access_key=s3cret", "sqs://h?aws_secret_access_key=****"),
    ("redis://u:s3cret@h/0?password=s3cret", "redis://u:****@h/0?password=****"),
    # nothing secret: untouched
    ("amqp://user@host//", "amqp://user@host//"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://[::1]:6379/0?db=1", "redis://[::1]:6379/0?db=1"),
    ("http://h/a:b@c", "http://h/a:b@c"),
    ("not a url", "not a url"),
    ("redis://[::1:6379/0", "redis://[::1:6379/0"),       # urlsplit would raise: we do not
])
def test_mask_url(url, masked):
    assert config.mask_url(url) == masked
    assert SECRET not in config.mask_url(url)


def test_mask_secrets_inside_longer_strings_and_structures():
    data = {"argv": ["celery-bench", "--amqp-url=amqp://u:pa/s3cret@h//",
                     "--redis-url", "redis://h/0?password=s3cret"],
            "reason": "redis at redis://:s3cret@h:1/0 unreachable: refused",
            "nested": [("postgresql://u:p@s3cret@h/db",)],
            "repr": "['amqp://u:s3cret@h//', 'x']",
            "count": 3}
    out = config.mask_secrets(data)
    assert SECRET not in repr(out)
    assert out["argv"][1] == "--amqp-url=amqp://u:****@h//"
    assert out["reason"] == "redis at redis://:****@h:1/0 unreachable: refused"
    assert out["count"] == 3


def test_a_usage_error_never_shows_a_password():
    err = config.UsageError("--transport redis: redis at redis://:s3cret@h:1/0 refused")
    assert SECRET not in str(err) and "redis://:****@h:1/0" in str(err)


def test_list_and_the_results_file_mask_query_string_secrets(cli_run, tmp_path):
    """redis unreachable (port 1): every redis cell is skipped at once, the file is written."""
    env = {"CELERY_BENCH_REDIS_URL": "redis://127.0.0.1:1/0?password=q-s3cret",
           "CELERY_BENCH_AMQP_URL": "amqp://guest:sl%2Fs3cret@127.0.0.1:1//"}
    res = cli_run("list", env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr
    assert "password=****" in res.stdout
    res = cli_run("run", "publish", "--only", "transport=redis", "--quiet", "--out", "r.json",
                  "--postgres-url", "postgresql://u@127.0.0.1:1/t?sslpassword=f-s3cret",
                  env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    text = (tmp_path / "r.json").read_text()
    assert SECRET not in text and SECRET not in res.stdout + res.stderr
    services = json.loads(text)["environment"]["services"]
    assert services["redis"]["url"] == "redis://127.0.0.1:1/0?password=****"
    assert services["amqp"]["url"] == "amqp://guest:****@127.0.0.1:1//"


# --------------------------------------------------------------------------- URL checks
@pytest.mark.parametrize("service, url", [
    *((name, url) for name, url in config.DEFAULTS.items()),
    ("redis", "rediss://:pw@redis.example.com:6380/2"),
    ("redis", "redis://[::1]:6379/0"),
    ("redis", "redis://[fe80::1%25eth0]:6379/0"),
    ("redis", "redis://u:p@ss@h:6379/0"),           # redis-py and kombu split at the last @
    ("redis", "redis://my_redis"),
    ("amqp", "amqps://u:p%2Fw@rabbit.local:5671/vhost"),
    ("amqp", "pyamqp://guest@localhost//"),
    ("postgres", "postgresql://u@/db?host=/var/run/postgresql"),
    ("postgres", "postgresql+psycopg://u:p%40w@[::1]:5432/db"),
])
def test_good_urls_pass(service, url):
    assert config.check_url(service, url, "--x-url") == url


@pytest.mark.parametrize("service, url, words", [
    ("redis", "redis://h:99999/0", ["port 99999"]),
    ("redis", "redis://h:0/0", ["port 0"]),
    ("redis", "redis://h:port/0", ["port 'port'"]),
    ("redis", "redis://:pa/s3cret@h:6379/0", ["%2F", "redis://:****@h"]),
    ("amqp", "amqp://u:p?s3cret@h//", ["%3F", "amqp://u:****@h"]),
    ("postgres", "postgresql://u:p@s3cret@h/db", ["%40", "postgresql://u:****@h"]),
    ("redis", "redis://[::1:6379/0", ["IPv6"]),
    ("redis", "redis://[::g]:6379/0", ["IPv6"]),
    ("redis", "redis://fe80::1:6379/0", ["brackets"]),
    ("redis", "redis:///0", ["no host"]),
    ("redis", "redis://h/db0", ["database 'db0'"]),
    ("redis", "redis://h\t/0", ["space or a control character"]),
    ("redis", "amqp://h//", ["scheme", "redis://"]),
    ("amqp", "localhost:5672", ["is not a URL"]),
    ("postgres", "postgres://u@h/db", ["scheme", "postgresql://"]),
    ("postgres", "mysql://u@h/db", ["scheme"]),
    ("amqp", "", ["empty"]),
])
def test_bad_urls_say_which_setting_and_what_is_wrong(service, url, words):
    with pytest.raises(config.UsageError) as err:
        config.check_url(service, url, "CELERY_BENCH_X_URL")
    text = str(err.value)
    assert text.startswith("CELERY_BENCH_X_URL") and "\n" not in text
    assert SECRET not in text
    for w in words:
        assert w in text, (w, text)


def test_service_url_checks_the_environment(monkeypatch):
    monkeypatch.setenv("CELERY_BENCH_REDIS_URL", "redis://127.0.0.1:99999/0")
    with pytest.raises(config.UsageError, match="CELERY_BENCH_REDIS_URL .*port 99999"):
        config.service_url("redis")
    monkeypatch.setenv("CELERY_BENCH_REDIS_URL", "")
    assert config.service_url("redis") == config.DEFAULTS["redis"]


def test_set_service_url_refuses_before_setting(monkeypatch):
    monkeypatch.delenv("CELERY_BENCH_AMQP_URL", raising=False)
    with pytest.raises(config.UsageError, match="--amqp-url"):
        config.set_service_url("amqp", "amqp://h:70000//", "--amqp-url")
    assert "CELERY_BENCH_AMQP_URL" not in os.environ


# --------------------------------------------------------------------------- option values
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", float("inf"), float("nan"), "0", "-1",
                                   "fast", None])
def test_positive_float_refuses(value):
    with pytest.raises(ValueError):
        options.parse_positive_float(value, "--rate")


@pytest.mark.parametrize("value, maximum", [("inf", None), ("nan", None), ("-0.1", None),
                                            ("4000", 3600)])
def test_seconds_refuse(value, maximum):
    with pytest.raises(ValueError):
        options.parse_seconds(value, "--warmup", maximum)


def test_numbers_that_pass():
    assert options.parse_positive_float("2000", "--rate") == 2000.0
    assert options.parse_seconds("0", "--warmup") == 0.0
    assert math.isfinite(options.parse_seconds(3600, "--task-seconds", 3600))


@pytest.mark.parametrize("spec", ["proj", ":app", "proj:", "my proj:app", "proj:app:x",
                                  "proj..x:app"])
def test_app_spec_refuses(spec):
    with pytest.raises(ValueError, match="MODULE:APP"):
        options.parse_app_spec(spec)


def test_app_spec_passes():
    assert options.parse_app_spec("proj.celery:app") == "proj.celery:app"


# --------------------------------------------------------------------------- JSON only
class _Evil:
    """Unpickling this creates a file: proof that pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_default_publish_matrix_is_json_only():
    from bench import runner
    from bench.scenarios import publish

    for quick in (False, True):
        cells = publish.Publish(runner.RunOptions(quick=quick)).cells()
        assert {c["serializer"] for c in cells} <= {"json", "-"}, quick


def test_a_cells_consumer_accepts_exactly_its_serializer():
    from bench.drivers import celery as celery_driver
    from bench.drivers import kombu as kombu_driver

    for ser in ("json", "pickle"):
        pub = celery_driver.Publisher(None, "q", "apply_async", "default", ser, "x", 1.0)
        assert pub.accept == [ser]
        assert kombu_driver.Publisher(None, "q", "held", ser, "x", 1.0).accept == [ser]


def test_a_json_consumer_never_unpickles(tmp_path):
    """A crafted pickle pushed onto a counting queue is refused, not run."""
    from kombu import Connection, Exchange, Queue
    from kombu.exceptions import ContentDisallowed

    from bench.drivers import celery as celery_driver
    from bench.drivers.consumer import Tally, drain

    marker = tmp_path / "pwned"
    with Connection("memory://") as conn:
        q = Queue("bench-evil", Exchange("bench-evil", "direct"), routing_key="bench-evil")
        q(conn.default_channel).declare()
        conn.Producer().publish(_Evil(marker), exchange=q.exchange, routing_key="bench-evil",
                                serializer="pickle")
        pub = celery_driver.Publisher(None, "q", "apply_async", "default", "json", "x", 1.0)
        tally = Tally(4)
        drain(conn, q, celery_driver.extract, tally, lambda: False, timeout=2.0,
              accept=pub.accept)
    # Issue 21: a message the consumer may not decode is counted as foreign (the cell
    # reports it), never a crash; the decode that refused it is kombu's ContentDisallowed.
    assert tally.foreign == 1 and tally.received == 0
    assert not marker.exists()
    assert issubclass(ContentDisallowed, Exception)
    assert pickle.dumps(_Evil(marker))  # the payload was a real pickle
