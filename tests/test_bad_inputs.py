"""Every user's mistake is ONE line on stderr naming the setting, exit 2, no traceback,
and it is caught before anything is measured.

Each case runs the real command (``cli_run``) in a fresh folder. A case is
``(args, words)`` plus, where needed, environment variables and a ``setup(tmp_path)``
that writes the files it points at. ``words`` must all appear in the one line (they
name the setting and what is wrong). A case that started measuring would take seconds
per cell; every case here must finish well inside ``TIMEOUT_S``.

Results files: ``r.json`` is a small valid run (two publish cells, three rounds); each
malformed variant is read through every reader (show, compare, gate, report).
"""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from factory import cell, write

TIMEOUT_S = 60
UNREACHABLE = "redis://127.0.0.1:1/0"


# --------------------------------------------------------------------------- helpers
def one_line(res, words=()):
    """The single stderr line of a usage error; asserts exit 2 and no traceback."""
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def good_run(path):
    return write(path,
                 cell(throughputs=(1000.0, 1100.0, 1050.0), api="kombu", producer="held",
                      transport="memory"),
                 cell(throughputs=(600.0, 650.0, 620.0), seed=1, api="kombu",
                      producer="per-call", transport="memory"))


def good_data(tmp_path):
    return json.loads(good_run(tmp_path / "r.json").read_text())


def write_text(name, text):
    def setup(tmp_path):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def both(*setups):
    def setup(tmp_path):
        for s in setups:
            s(tmp_path)
    return setup


def mutated(name, mutate):
    """``name``: the valid run with ``mutate(data)`` applied."""
    def setup(tmp_path):
        data = good_data(tmp_path)
        mutate(data)
        (tmp_path / name).write_text(json.dumps(data))
    return setup


def base(tmp_path):
    good_run(tmp_path / "r.json")


def _c0(d):
    return d["cells"][0]


def _set(path, value):
    """A mutation setting ``data[path...] = value`` (path: keys/indexes; '*' = each)."""
    def mutate(d):
        def walk(node, keys):
            key, rest = keys[0], keys[1:]
            targets = range(len(node)) if key == "*" else [key]
            for k in targets:
                if rest:
                    walk(node[k], rest)
                else:
                    node[k] = copy.deepcopy(value)
        walk(d, list(path))
    return mutate


def _pop(path):
    def mutate(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        node.pop(path[-1])
    return mutate


H = ("cells", 0, "histograms", "publish_us")
R = ("cells", 0, "repeats", "*")

# --------------------------------------------------------------------------- awaiting
# Cases whose fix belongs to another file's owner: strict xfail, so each turns into a
# failure (XPASS) the moment its fix lands, and its line here must then go.
RESULTS_VALIDATE = ("bench/results.py: validate() every level the readers use, load() refusing "
                    "NaN/Infinity (and dump() writing them as null)")
REPORT_OUT = "bench/cli.py report_: --out (or the default output) checked before writing"
AWAITING: dict = {}   # cases whose fix has not landed yet (none now)


def case(case_id, *values):
    marks = [pytest.mark.xfail(strict=True, reason=AWAITING[case_id])] \
        if case_id in AWAITING else []
    return pytest.param(*values, id=case_id, marks=marks)


# --------------------------------------------------------------------------- malformed runs
# (id, how to make bad.json, words of the message besides the file name)
BAD_FILES = [
    ("empty", write_text("bad.json", ""), ["not a celery-bench results file"]),
    ("truncated", lambda t: (t / "bad.json").write_text(
        (good_run(t / "r.json")).read_text()[:300]), ["not a celery-bench results file"]),
    ("non-utf8", write_text("bad.json", b'{"schema": "celery-bench/1\xff\xfe"}'),
     ["not a celery-bench results file"]),
    ("json-list", write_text("bad.json", "[]"), ["JSON object"]),
    ("json-null", write_text("bad.json", "null"), ["JSON object"]),
    ("old-schema", mutated("bad.json", _set(("schema",), "celery-bench/0")), ["schema"]),
    ("no-schema", mutated("bad.json", _pop(("schema",))), ["schema"]),
    ("env-list", mutated("bad.json", _set(("environment",), [])), ["environment"]),
    ("no-cells", mutated("bad.json", _pop(("cells",))), ["cells"]),
    ("cells-5", mutated("bad.json", _set(("cells",), 5)), ["cells"]),
    ("cell-null", mutated("bad.json", _set(("cells",), [None])), ["cell 0"]),
    ("scenario-5", mutated("bad.json", _set(("cells", 0, "scenario"), 5)), ["scenario"]),
    ("params-list", mutated("bad.json", _set(("cells", 0, "params"), [])), ["params"]),
    ("param-value-list", mutated("bad.json", _set(("cells", 0, "params", "api"), ["x"])),
     ["api"]),
    ("status-bogus", mutated("bad.json", _set(("cells", 0, "status"), "great")), ["status"]),
    ("reason-5", mutated("bad.json", _set(("cells", 0, "reason"), 5)), ["reason"]),
    ("reason-list", mutated("bad.json", _set(("cells", 0, "reason"), ["a"])), ["reason"]),
    ("exempt-list", mutated("bad.json", _set(("cells", 0, "exempt"), ["a"])), ["exempt"]),
    ("metrics-list", mutated("bad.json", _set(("cells", 0, "metrics"), [])), ["metrics"]),
    ("spread-list", mutated("bad.json", _set(("cells", 0, "spread"), [])), ["spread"]),
    ("spread-value-list", mutated("bad.json", _set(("cells", 0, "spread", "throughput_per_s"),
                                                   [1])), ["spread"]),
    ("repeats-dict", mutated("bad.json", _set(("cells", 0, "repeats"), {})), ["repeats"]),
    ("repeat-5", mutated("bad.json", _set(R, 5)), ["repeat"]),
    ("repeat-metrics-list", mutated("bad.json", _set(R + ("metrics",), [])), ["metrics"]),
    ("repeat-histogram-list", mutated("bad.json", _set(R + ("histograms", "publish_us"), [])),
     ["histogram"]),
    ("repeat-round-text", mutated("bad.json", _set(R + ("round",), "first")), ["round"]),
    ("histograms-list", mutated("bad.json", _set(("cells", 0, "histograms"), [])),
     ["histograms"]),
    ("histogram-list", mutated("bad.json", _set(H, [])), ["histogram"]),
    ("histogram-no-p99", mutated("bad.json", _pop(H + ("p99",))), ["p99"]),
    ("histogram-count-text", mutated("bad.json", _set(H + ("count",), "many")), ["count"]),
    ("histogram-p99-text", mutated("bad.json", _set(H + ("p99",), "slow")), ["p99"]),
    ("histogram-unit-5", mutated("bad.json", _set(H + ("unit",), 5)), ["unit"]),
    ("hdr-5", mutated("bad.json", _set(H + ("hdr",), 5)), ["hdr"]),
    ("hdr-not-base64", mutated("bad.json", _set(H + ("hdr",), "!!not base64!!")), ["hdr"]),
    ("hdr-not-a-histogram", mutated("bad.json", _set(H + ("hdr",), "aGVsbG8gd29ybGQ=")),
     ["hdr"]),
    ("intervals-5", mutated("bad.json", _set(H + ("intervals",), 5)), ["intervals"]),
    ("interval-no-end", mutated("bad.json", _set(H + ("intervals",), [{"start_s": 1.0}])),
     ["intervals"]),
    ("options-5", mutated("bad.json", _set(("environment", "options"), 5)), ["options"]),
    ("metric-infinity", mutated("bad.json", _set(("cells", 0, "metrics", "throughput_per_s"),
                                                 float("inf"))), ["Infinity"]),
]
READERS = {
    "show": ["show", "bad.json"],
    "compare": ["compare", "r.json", "bad.json"],
    "gate": ["gate", "bad.json", "--budget", "0"],
    "report": ["report", "bad.json", "--format", "html", "--out", "out.html"],
    "history-add": ["history", "add", "bad.json", "--dir", "hist"],
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("setup, words", [case(i, s, w) for i, s, w in BAD_FILES])
def test_malformed_results_file(cli_run, tmp_path, setup, words, reader):
    base(tmp_path)
    setup(tmp_path)
    one_line(cli_run(*READERS[reader], timeout=TIMEOUT_S), ["bad.json", *words])


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("setup, words", [case(i, s, w) for i, s, w in BAD_FILES])
def test_malformed_results_file_in_process(cli_inproc, tmp_path, setup, words, reader):
    """The fast tier's twin: the same cases through click's CliRunner."""
    test_malformed_results_file(cli_inproc, tmp_path, setup, words, reader)


# --------------------------------------------------------------------------- everything else
def spec(text, name="spec.toml"):
    return both(base, write_text(name, text))


GOOD_RULE = ('[[gate]]\nname = "x"\ncheck = "publish[api=kombu,producer=per-call] '
             'throughput_per_s / [producer=held] between 0.1 and 0.9"\n')


def socket_dir(mode):
    """A folder for a unix socket, with ``mode``."""
    def setup(tmp_path):
        d = tmp_path / "sock"
        d.mkdir()
        os.chmod(d, mode)
    return setup


def long_socket_path(tmp_path):
    return "unix://" + str(tmp_path / ("s" * 120) / "broker.sock")


CASES = [
    # ---- run: numbers (inf and nan are floats to Python, not to us)
    ("run-repeat-0", ["run", "--repeat", "0"], None, None, ["--repeat"]),
    ("run-repeat-huge", ["run", "--repeat", "100000"], None, None, ["--repeat"]),
    ("run-rate-negative", ["run", "--rate", "-5"], None, None, ["--rate", "> 0"]),
    ("run-rate-0", ["run", "--rate", "0"], None, None, ["--rate", "> 0"]),
    ("run-rate-inf", ["run", "--rate", "inf"], None, None, ["--rate", "finite"]),
    ("run-rate-nan", ["run", "--rate", "nan"], None, None, ["--rate", "finite"]),
    ("run-rate-text", ["run", "--rate", "fast"], None, None, ["--rate"]),
    ("run-duration-0", ["run", "--duration", "0"], None, None, ["--duration"]),
    ("run-duration-negative", ["run", "--duration", "-1"], None, None, ["--duration"]),
    ("run-cpus-role", ["run", "worker", "--cpus", "broker=0,boss=1"], None, None,
     ["--cpus", "boss", "publisher, broker, worker, pool"]),
    ("run-cpus-absent", ["run", "worker", "--cpus", "pool=4096"], None, None,
     ["--cpus", "CPU 4096 is not available"]),
    ("run-cpus-text", ["run", "worker", "--cpus", "worker=two"], None, None,
     ["--cpus", "CPUS is a number"]),
    ("run-duration-inf", ["run", "--duration", "inf"], None, None, ["--duration", "finite"]),
    ("run-duration-nan", ["run", "--duration", "NaN"], None, None, ["--duration", "finite"]),
    ("run-warmup-negative", ["run", "--warmup", "-1"], None, None, ["--warmup", ">= 0"]),
    ("run-warmup-inf", ["run", "--warmup", "inf"], None, None, ["--warmup", "finite"]),
    ("run-warmup-nan", ["run", "--warmup", "nan"], None, None, ["--warmup", "finite"]),
    ("run-timeout-0", ["run", "--timeout", "0"], None, None, ["--timeout"]),
    ("run-timeout-inf", ["run", "--timeout", "inf"], None, None, ["--timeout", "finite"]),
    ("run-timeout-nan", ["run", "--timeout", "nan"], None, None, ["--timeout", "finite"]),
    ("run-task-seconds-negative", ["run", "--task-seconds", "-0.5"], None, None,
     ["--task-seconds"]),
    ("run-task-seconds-nan", ["run", "--task-seconds", "nan"], None, None,
     ["--task-seconds", "finite"]),
    ("run-task-seconds-inf", ["run", "--task-seconds", "inf"], None, None,
     ["--task-seconds", "finite"]),
    ("run-task-seconds-too-long", ["run", "--task-seconds", "4000"], None, None,
     ["--task-seconds", "3600"]),
    ("run-messages-0", ["run", "--messages", "0"], None, None, ["--messages"]),
    ("run-payload-negative", ["run", "--payload-bytes", "-1"], None, None, ["--payload-bytes"]),
    ("run-concurrency-0", ["run", "--concurrency", "0"], None, None, ["--concurrency"]),
    # ---- run: names
    ("run-unknown-scenario", ["run", "nosuch"], None, None, ["scenario 'nosuch'"]),
    ("run-unknown-transport", ["run", "--transport", "pigeon"], None, None,
     ["pigeon", "choose from"]),
    ("run-unknown-pool", ["run", "--pool", "fork"], None, None, ["--pool"]),
    ("run-unknown-serializer", ["run", "--serializer", "xml"], None, None, ["--serializer"]),
    ("run-unknown-option", ["run", "--frobnicate"], None, None, ["--frobnicate"]),
    ("unknown-command", ["frobnicate"], None, None, ["frobnicate"]),
    # ---- run: --only
    ("run-only-no-equals", ["run", "--only", "api"], None, None, ["--only", "KEY=VALUE"]),
    ("run-only-no-key", ["run", "--only", "=kombu"], None, None, ["--only", "KEY=VALUE"]),
    ("run-only-no-value", ["run", "--only", "api="], None, None, ["--only", "KEY=VALUE"]),
    ("run-only-unknown-param", ["run", "publish", "--only", "colour=red", "--out", "o.json"],
     None, None, ["--only", "colour"]),
    ("run-only-no-match", ["run", "publish", "--only", "api=nosuch", "--out", "o.json",
                           "--quiet"], None, None, ["no cell matches"]),
    ("run-only-pickle-not-in-default-matrix", ["run", "publish", "--only", "serializer=pickle",
                                               "--out", "o.json", "--quiet"], None, None,
     ["no cell matches"]),
    # ---- run: --app / --task
    ("run-app-no-colon", ["run", "--app", "proj"], None, None, ["--app", "MODULE:APP"]),
    ("run-app-no-module", ["run", "--app", ":app"], None, None, ["--app", "MODULE:APP"]),
    ("run-app-no-attr", ["run", "--app", "proj:"], None, None, ["--app", "MODULE:APP"]),
    ("run-app-not-a-name", ["run", "--app", "my proj:app"], None, None, ["--app", "MODULE:APP"]),
    ("run-task-without-app", ["run", "--task", "proj.add"], None, None, ["--task", "--app"]),
    # ---- run: --out, checked before anything is measured
    ("run-out-is-a-folder", ["run", "publish", "--out", "folder"],
     None, lambda t: (t / "folder").mkdir(), ["--out", "folder"]),
    ("run-out-under-a-file", ["run", "publish", "--out", "afile/r.json"],
     None, write_text("afile", "x"), ["--out", "afile/r.json"]),
    ("run-out-empty", ["run", "publish", "--out", ""], None, None, ["--out"]),
    # ---- service URLs given by flag: parsed up front, printed masked
    ("redis-url-not-a-url", ["run", "--redis-url", "localhost"], None, None,
     ["--redis-url", "is not a URL"]),
    ("redis-url-empty", ["run", "--redis-url", ""], None, None, ["--redis-url", "empty"]),
    ("redis-url-wrong-scheme", ["run", "--redis-url", "http://127.0.0.1:6379/0"], None, None,
     ["--redis-url", "scheme", "redis://"]),
    ("redis-url-port-99999", ["run", "--redis-url", "redis://127.0.0.1:99999/0"], None, None,
     ["--redis-url", "port 99999", "65535"]),
    ("redis-url-port-0", ["run", "--redis-url", "redis://127.0.0.1:0/0"], None, None,
     ["--redis-url", "port 0"]),
    ("redis-url-port-text", ["run", "--redis-url", "redis://127.0.0.1:http/0"], None, None,
     ["--redis-url", "port 'http'"]),
    ("redis-url-slash-in-password", ["run", "--redis-url", "redis://:pa/ss-s3cret@h:6379/0"],
     None, None, ["--redis-url", "percent-encode", "redis://:****@"]),
    ("redis-url-bad-ipv6", ["run", "--redis-url", "redis://[::1:6379/0"], None, None,
     ["--redis-url", "IPv6"]),
    ("redis-url-invalid-ipv6", ["run", "--redis-url", "redis://[fe80::zz]:6379/0"], None, None,
     ["--redis-url", "IPv6"]),
    ("redis-url-ipv6-no-brackets", ["run", "--redis-url", "redis://::1:6379/0"], None, None,
     ["--redis-url", "brackets"]),
    ("redis-url-no-host", ["run", "--redis-url", "redis://:s3cret@/0"], None, None,
     ["--redis-url", "no host", "redis://:****@"]),
    ("redis-url-bad-host", ["run", "--redis-url", "redis://ho$t:6379/0"], None, None,
     ["--redis-url", "host"]),
    ("redis-url-database-text", ["run", "--redis-url", "redis://127.0.0.1:6379/zero"], None,
     None, ["--redis-url", "database 'zero'"]),
    ("redis-url-space", ["run", "--redis-url", "redis://127.0.0.1:6379/0 x"], None, None,
     ["--redis-url", "space"]),
    ("amqp-url-not-a-url", ["run", "--amqp-url", "localhost"], None, None,
     ["--amqp-url", "is not a URL"]),
    ("amqp-url-port-70000", ["run", "--amqp-url", "amqp://guest:guest@127.0.0.1:70000//"], None,
     None, ["--amqp-url", "port 70000", "amqp://guest:****@"]),
    ("amqp-url-slash-in-password", ["run", "--amqp-url", "amqp://guest:s3/cret@127.0.0.1//"],
     None, None, ["--amqp-url", "%2F", "amqp://guest:****@"]),
    ("amqp-url-redis-scheme", ["run", "--amqp-url", "redis://127.0.0.1:6379/0"], None, None,
     ["--amqp-url", "scheme", "amqp://"]),
    ("postgres-url-old-scheme", ["run", "--postgres-url", "postgres://u@127.0.0.1/test"], None,
     None, ["--postgres-url", "scheme", "postgresql://"]),
    ("postgres-url-unknown-driver", ["run", "--postgres-url",
                                     "postgresql+nosuch://u@127.0.0.1/test"], None, None,
     ["--postgres-url", "scheme"]),
    ("postgres-url-at-in-password", ["run", "--postgres-url",
                                     "postgresql://u:p@ss-s3cret@127.0.0.1/test"], None, None,
     ["--postgres-url", "%40", "postgresql://u:****@"]),
    ("postgres-url-port-99999", ["run", "--postgres-url", "postgresql://u@127.0.0.1:99999/t"],
     None, None, ["--postgres-url", "port 99999"]),
    # ---- the same through the environment, for run and list
    ("env-redis-port-99999-run", ["run", "publish", "--out", "o.json"],
     {"CELERY_BENCH_REDIS_URL": "redis://127.0.0.1:99999/0"}, None,
     ["CELERY_BENCH_REDIS_URL", "port 99999"]),
    ("env-redis-port-99999-list", ["list"], {"CELERY_BENCH_REDIS_URL": "redis://h:99999/0"},
     None, ["CELERY_BENCH_REDIS_URL", "port 99999"]),
    ("env-amqp-slash-in-password-list", ["list"],
     {"CELERY_BENCH_AMQP_URL": "amqp://guest:s3/cret@127.0.0.1:5672//"}, None,
     ["CELERY_BENCH_AMQP_URL", "amqp://guest:****@", "percent-encode"]),
    ("env-amqp-not-a-url-run", ["run", "--out", "o.json"], {"CELERY_BENCH_AMQP_URL": "rabbit"},
     None, ["CELERY_BENCH_AMQP_URL", "is not a URL"]),
    ("env-postgres-bad-ipv6-run", ["run", "--out", "o.json"],
     {"CELERY_BENCH_POSTGRES_URL": "postgresql://u@[::1/test"}, None,
     ["CELERY_BENCH_POSTGRES_URL", "IPv6"]),
    ("env-postgres-bad-ipv6-list", ["list"],
     {"CELERY_BENCH_POSTGRES_URL": "postgresql://u@[zz]:5432/test"}, None,
     ["CELERY_BENCH_POSTGRES_URL", "IPv6"]),
    ("env-redis-wrong-scheme-list", ["list"], {"CELERY_BENCH_REDIS_URL": "amqp://h//"}, None,
     ["CELERY_BENCH_REDIS_URL", "scheme"]),
    ("named-transport-unreachable", ["run", "publish", "--transport", "redis", "--out", "o.json"],
     {"CELERY_BENCH_REDIS_URL": UNREACHABLE}, None, ["--transport redis", "127.0.0.1:1"]),
    # ---- plugins
    ("plugin-missing", ["list"], {"CELERY_BENCH_PLUGINS": "nosuch_plugin_xyz"}, None,
     ["CELERY_BENCH_PLUGINS", "nosuch_plugin_xyz"]),
    ("plugin-raises", ["show", "r.json"], {"CELERY_BENCH_PLUGINS": "broken_plugin"},
     both(base, write_text("broken_plugin.py", "raise RuntimeError('boom')\n")),
     ["CELERY_BENCH_PLUGINS", "broken_plugin", "boom"]),
    ("plugin-syntax-error", ["list"], {"CELERY_BENCH_PLUGINS": "syntax_plugin"},
     write_text("syntax_plugin.py", "def (:\n"), ["CELERY_BENCH_PLUGINS", "syntax_plugin"]),
    ("plugin-bad-transport", ["list"], {"CELERY_BENCH_PLUGINS": "bad_transport"},
     write_text("bad_transport.py", "TRANSPORT = 5\n"),
     ["CELERY_BENCH_PLUGINS", "bad_transport", "TRANSPORT"]),
    # ---- list
    ("list-extra-argument", ["list", "extra"], None, None, ["extra"]),
    # ---- show
    ("show-missing-file", ["show", "missing.json"], None, None, ["missing.json"]),
    ("show-folder", ["show", "folder"], None, lambda t: (t / "folder").mkdir(), ["folder"]),
    ("show-width-too-small", ["show", "r.json", "--width", "10"], None, base, ["--width"]),
    # ---- compare
    ("compare-missing-file", ["compare", "r.json", "missing.json"], None, base,
     ["missing.json"]),
    ("compare-folder", ["compare", "r.json", "folder"], None,
     both(base, lambda t: (t / "folder").mkdir()), ["folder"]),
    ("compare-three-files", ["compare", "r.json", "r.json", "r.json"], None, base,
     ["one or two results files"]),
    ("compare-one-file-nothing-to-compare", ["compare", "r.json"], None, base,
     ["compare needs"]),
    ("compare-by-with-two-files", ["compare", "r.json", "r.json", "--by", "producer"], None,
     base, ["--by", "ONE run"]),
    ("compare-ref-without-by", ["compare", "r.json", "--ref", "held"], None, base,
     ["--ref", "--by"]),
    ("compare-by-unknown-param", ["compare", "r.json", "--by", "colour"], None, base,
     ["--by colour"]),
    ("compare-cell-no-brackets", ["compare", "r.json", "--cell", "publish"], None, base,
     ["--cell", "selector"]),
    ("compare-cell-no-equals", ["compare", "r.json", "--cell", "publish[api]"], None, base,
     ["--cell", "key=value"]),
    ("compare-cell-unclosed", ["compare", "r.json", "--cell", "publish[api=kombu"], None, base,
     ["--cell", "selector"]),
    ("compare-cell-empty-key", ["compare", "r.json", "--cell", "publish[=kombu]"], None, base,
     ["--cell", "key=value"]),
    ("compare-two-cells-no-match", ["compare", "r.json", "--cell", "publish[producer=held]",
                                    "--cell", "publish[producer=nosuch]"], None, base,
     ["--cell", "matches 0 cells"]),
    ("compare-noise-negative", ["compare", "r.json", "--by", "producer", "--noise", "-1"], None,
     base, ["--noise"]),
    ("compare-noise-nan", ["compare", "r.json", "--by", "producer", "--noise", "nan"], None,
     base, ["--noise"]),
    ("compare-fail-on-unknown", ["compare", "r.json", "--by", "producer", "--fail-on", "worse"],
     None, base, ["--fail-on"]),
    # ---- gate
    ("gate-missing-results", ["gate", "missing.json"], None, None, ["missing.json"]),
    ("gate-spec-missing", ["gate", "r.json", "--spec", "missing.toml"], None, base,
     ["missing.toml"]),
    ("gate-spec-folder", ["gate", "r.json", "--spec", "folder"], None,
     both(base, lambda t: (t / "folder").mkdir()), ["folder"]),
    ("gate-spec-not-toml", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec("this is = = not toml\n"), ["spec.toml", "TOML"]),
    ("gate-spec-non-utf8", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec(b"name = \"\xff\"\n"), ["spec.toml"]),
    ("gate-spec-json-list", ["gate", "r.json", "--spec", "spec.json"], None,
     spec("[]", "spec.json"), ["spec.json", "table"]),
    ("gate-spec-unknown-key", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec("colour = \"red\"\n" + GOOD_RULE), ["spec.toml", "colour"]),
    ("gate-spec-no-rules", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec("missing = \"warn\"\n"), ["spec.toml", "no rules"]),
    ("gate-spec-rule-without-check", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec("[[gate]]\nname = \"x\"\n"), ["rule 1", "check"]),
    ("gate-spec-rule-unknown-key", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec(GOOD_RULE + "colour = 1\n"), ["rule 1", "colour"]),
    ("gate-spec-check-garbage", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec("[[gate]]\ncheck = \"publish[api=kombu] throughput_per_s >= fast\"\n"),
     ["rule 1"]),
    ("gate-spec-check-no-scenario", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec("[[gate]]\ncheck = \"[api=kombu] throughput_per_s >= 1\"\n"), ["rule 1", "scenario"]),
    ("gate-spec-between-reversed", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec("[[gate]]\ncheck = \"publish[api=kombu] throughput_per_s between 9 and 1\"\n"),
     ["rule 1", "LOW is above HIGH"]),
    ("gate-spec-exact-text", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec(GOOD_RULE + "exact = \"yes\"\n"), ["rule 1", "exact"]),
    ("gate-spec-missing-mode", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec("missing = \"sometimes\"\n" + GOOD_RULE), ["spec.toml", "missing"]),
    ("gate-spec-baseline-number", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec("baseline = 5\n" + GOOD_RULE), ["spec.toml", "baseline"]),
    ("gate-baseline-missing", ["gate", "r.json", "--spec", "spec.toml"], None,
     spec("baseline = \"nosuch.json\"\n[[gate]]\ncheck = \"publish[api=kombu,producer=held] "
          "throughput_per_s >= baseline -10%\"\n"), ["nosuch.json", "does not exist"]),
    ("gate-baseline-malformed", ["gate", "r.json", "--spec", "spec.toml", "--baseline",
                                 "bad.json"], None,
     both(spec("[[gate]]\ncheck = \"publish[api=kombu,producer=held] throughput_per_s >= "
               "baseline -10%\"\n"), mutated("bad.json", _set(("cells",), 5))),
     ["bad.json", "not a celery-bench results file"]),
    ("gate-missing-unknown", ["gate", "r.json", "--missing", "shrug"], None, base,
     ["--missing"]),
    ("gate-budget-negative", ["gate", "r.json", "--budget", "-1"], None, base, ["--budget"]),
    ("gate-budget-nan", ["gate", "r.json", "--budget", "nan"], None, base, ["--budget"]),
    ("gate-write-baseline-without-baseline", ["gate", "r.json", "--spec", "spec.toml",
                                              "--write-baseline"], None, spec(GOOD_RULE),
     ["--write-baseline", "baseline"]),
    ("gate-write-baseline-to-folder", ["gate", "r.json", "--spec", "spec.toml",
                                       "--write-baseline", "--baseline", "folder"], None,
     both(spec(GOOD_RULE), lambda t: (t / "folder").mkdir()), ["--baseline", "folder"]),
    ("gate-write-baseline-under-a-file", ["gate", "r.json", "--spec", "spec.toml",
                                          "--write-baseline", "--baseline", "afile/b.json"],
     None, both(spec(GOOD_RULE), write_text("afile", "x")),
     ["--write-baseline", "afile/b.json"]),
    # ---- report
    ("report-unknown-format", ["report", "r.json", "--format", "pdf"], None, base, ["--format"]),
    ("report-missing-file", ["report", "missing.json"], None, None, ["missing.json"]),
    ("report-three-files", ["report", "r.json", "r.json", "r.json"], None, base,
     ["one or two results files"]),
    ("report-two-files-not-html", ["report", "r.json", "r.json", "--format", "md"], None, base,
     ["--format html"]),
    ("report-cell-bad-selector", ["report", "r.json", "--cell", "publish[api]"], None, base,
     ["--cell", "key=value"]),
    ("report-cell-no-match", ["report", "r.json", "--cell", "publish[api=nosuch]"], None, base,
     ["--cell", "no cell"]),
    ("report-unknown-histogram", ["report", "r.json", "--format", "png", "--hist", "nope",
                                  "--out", "o.png"], None, base, ["no recorded histogram"]),
    ("report-out-folder-md", ["report", "r.json", "--format", "md", "--out", "folder"], None,
     both(base, lambda t: (t / "folder").mkdir()), ["--out", "folder"]),
    ("report-out-folder-png", ["report", "r.json", "--format", "png", "--out", "folder"], None,
     both(base, lambda t: (t / "folder").mkdir()), ["--out", "folder"]),
    ("report-out-under-a-file-csv", ["report", "r.json", "--format", "csv", "--out",
                                     "afile/r.csv"], None, both(base, write_text("afile", "x")),
     ["--out", "afile/r.csv"]),
    ("report-out-under-a-file-html", ["report", "r.json", "--format", "html", "--out",
                                      "afile/r.html"], None, both(base, write_text("afile", "x")),
     ["--out", "afile/r.html"]),
    ("report-hgrm-out-is-a-file", ["report", "r.json", "--format", "hgrm", "--out", "afile"],
     None, both(base, write_text("afile", "x")), ["--out", "afile"]),
    # ---- broker: the socket path
    ("broker-relative-path", ["broker", "relative/broker.sock"], None, None,
     ["absolute socket path"]),
    ("broker-relative-url", ["broker", "unix://broker.sock"], None, None,
     ["absolute socket path"]),
    ("broker-wrong-scheme", ["broker", "http://127.0.0.1/broker.sock"], None, None,
     ["unix://"]),
    ("broker-path-too-long", ["broker", "LONG"], None, None, ["at most 107"]),
    ("broker-existing-file", ["broker", "SOCK/file.sock"], None,
     both(socket_dir(0o700), write_text("sock/file.sock", "x")), ["not a socket"]),
    ("broker-folder-others-can-enter", ["broker", "SOCK/broker.sock"], None, socket_dir(0o755),
     ["open to other users"]),
    ("broker-parent-is-a-file", ["broker", "SOCK/afile/broker.sock"], None,
     both(socket_dir(0o700), write_text("sock/afile", "x")), ["not a directory"]),
    ("broker-unknown-option", ["broker", "unix:///tmp/x.sock", "--max-queue-msgs", "5"], None,
     None, ["--max-queue-msgs"]),
    ("broker-bad-limit", ["broker", "unix:///tmp/x.sock", "--max-memory", "lots"], None,
     None, ["--max-memory"]),
    ("broker-client-share-0", ["broker", "unix:///tmp/x.sock", "--max-client-unacked", "0"],
     None, None, ["--max-client-unacked", "> 0"]),
    ("broker-client-bytes-bad", ["broker", "unix:///tmp/x.sock", "--max-client-unacked-bytes",
                                 "-1"], None, None, ["--max-client-unacked-bytes"]),
    ("broker-client-output-small", ["broker", "unix:///tmp/x.sock", "--max-client-output",
                                    "1k"], None, None, ["--max-client-output", "4 KiB"]),
    ("broker-client-memory-0", ["broker", "unix:///tmp/x.sock", "--max-client-memory", "0"],
     None, None, ["--max-client-memory", "> 0"]),
    ("broker-client-objects-bad", ["broker", "unix:///tmp/x.sock", "--max-client-objects",
                                   "-5"], None, None, ["--max-client-objects", ">= 0"]),
    ("broker-process-reserved-small", ["broker", "unix:///tmp/x.sock",
                                       "--max-process-reserved", "1M"], None, None,
     ["--max-process-reserved", "--max-frame"]),
]


def _resolve(args, tmp_path):
    out = []
    for a in args:
        if a == "LONG":
            a = long_socket_path(tmp_path)
        elif a.startswith("SOCK/"):
            a = "unix://" + str(tmp_path / "sock" / a[5:])
        out.append(a)
    return out


@pytest.mark.parametrize("args, env, setup, words",
                         [case(i, a, e, s, w) for i, a, e, s, w in CASES])
def test_bad_input(cli_run, tmp_path, args, env, setup, words):
    if setup:
        setup(tmp_path)
    env = dict(env or {})
    if "CELERY_BENCH_PLUGINS" in env:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path),
                                                         os.environ.get("PYTHONPATH")]))
    line = one_line(cli_run(*_resolve(args, tmp_path), env=env, timeout=TIMEOUT_S), words)
    assert "s3cret" not in line and "s3/cret" not in line     # passwords are masked


def _in_process(args, env):
    """A case runs in-process unless it imports plugins (they stay in sys.modules)."""
    # `broker` hands its raw arguments to transports.broker's own parser, which writes to the
    # process's stderr, not CliRunner's: those cases run as subprocesses only.
    return "CELERY_BENCH_PLUGINS" not in (env or {}) and args[:1] != ("broker",) and \
        list(args[:1]) != ["broker"]


@pytest.mark.parametrize("args, env, setup, words",
                         [case(i, a, e, s, w) for i, a, e, s, w in CASES if _in_process(a, e)])
def test_bad_input_in_process(cli_inproc, tmp_path, args, env, setup, words):
    """The fast tier's twin: the same cases through click's CliRunner."""
    test_bad_input(cli_inproc, tmp_path, args, env, setup, words)


def test_yaml_serializer_not_installed(cli_run):
    pytest.importorskip("kombu")
    try:
        import yaml  # noqa: F401
        pytest.skip("PyYAML is installed here: --serializer yaml is usable")
    except ImportError:
        pass
    one_line(cli_run("run", "--serializer", "yaml", timeout=TIMEOUT_S),
             ["--serializer", "yaml", "pip install"])


# --------------------------------------------------------------------------- permissions
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def _drop_file_capabilities():
    """In the child, before exec: root without the capabilities that bypass file modes
    (so a file chmod 000 is unreadable and a folder 0555 unwritable, as for anyone)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _without_privileges(*args, cwd):
    kwargs = {"preexec_fn": _drop_file_capabilities} if os.geteuid() == 0 else {}
    env = dict(os.environ, COLUMNS="200")
    try:
        return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd,
                              capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                              **kwargs)
    except subprocess.SubprocessError as exc:
        if "preexec_fn" in str(exc):
            pytest.skip(f"cannot drop root's file capabilities here: {exc}")
        raise


def _locked(d: Path, name: str, folder=False) -> Path:
    p = d / name
    if folder:
        p.mkdir()
        os.chmod(p, 0o555)              # may be entered, not written
    else:
        shutil.copy(d / "r.json", p)
        os.chmod(p, 0)                  # may not be read
    return p


PERMISSION_CASES = [
    ("unreadable-show", ["show", "locked.json"], "locked.json", False, ["locked.json"]),
    ("unreadable-compare", ["compare", "r.json", "locked.json"], "locked.json", False,
     ["locked.json"]),
    ("unreadable-gate", ["gate", "locked.json"], "locked.json", False, ["locked.json"]),
    ("unreadable-report", ["report", "locked.json"], "locked.json", False, ["locked.json"]),
    ("unreadable-gate-spec", ["gate", "r.json", "--spec", "locked.toml"], "locked.toml", False,
     ["locked.toml"]),
    ("unwritable-run-out", ["run", "publish", "--out", "ro/r.json"], "ro", True,
     ["--out", "ro/r.json"]),
    ("unwritable-report-out", ["report", "r.json", "--format", "md", "--out", "ro/r.md"], "ro",
     True, ["--out", "ro/r.md"]),
    ("unwritable-report-out-png", ["report", "r.json", "--format", "png", "--out", "ro/r.png"],
     "ro", True, ["--out", "ro/r.png"]),
    ("unwritable-write-baseline", ["gate", "r.json", "--write-baseline", "--baseline",
                                   "ro/b.json"], "ro", True, ["--write-baseline", "ro/b.json"]),
]


@pytest.mark.slow   # each case starts the command as a subprocess without privileges
@pytest.mark.parametrize("args, name, folder, words",
                         [case(i, a, n, f, w) for i, a, n, f, w in PERMISSION_CASES])
def test_permissions(tmp_path, args, name, folder, words):
    base(tmp_path)
    _locked(tmp_path, name, folder)
    try:
        one_line(_without_privileges(*args, cwd=tmp_path), words)
    finally:
        for p in tmp_path.iterdir():
            os.chmod(p, 0o755)          # so pytest can remove it
