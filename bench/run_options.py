"""The options of ``celery-bench run``, each declared once in :data:`OPTIONS`.

A declaration gives the option's click parameter (flags, help, type, check), its
:class:`RunOptions` field (name, default), how the click value becomes the field's
(``convert``) and how the field is written to the results' ``options`` record and read
back (``record``/``restore``). ``bench.cli`` builds ``run``'s parameters from the table,
:class:`RunOptions` takes its fields from it, and :meth:`RunOptions.to_dict` writes what it
says; adding an option is one entry here (tests/test_cli.py checks the three agree).
Entries with ``cli_only=True`` are command-line only (the report, variants, service URLs);
``workdir`` is a field only (set by the runner and by tests).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import click

# Light imports only: bench.cli imports this at start-up, before plugins and scenarios load
# (a bad plugin is then one line from main, and Ctrl-C early still leaves a results file).
from . import cli_params, config

# --quick runs every cell in this many interleaved rounds: the fewest from which a paired
# ratio gets an interval (bench.stats), so the gate can judge what `make bench` wrote.
QUICK_ROUNDS = 3
INSTRUCTIONS = "instructions"   # the opt-in scenario --instructions adds
SECRET = "(given; not stored: it may hold a secret)"


def parse_only(items) -> tuple:
    pairs = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise config.UsageError(
                f"--only {item!r}: expected KEY=VALUE, e.g. --only api=kombu")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def _listed(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Option:
    """One option of ``run``: see the module's docstring."""
    name: str                       # the RunOptions field and the results key
    decls: tuple = ()               # click's parameter declarations; () = a field only
    default: object = None          # the field's default
    annotation: str = "object"      # the field's type, as written
    click: dict = field(default_factory=dict)   # click.option/argument keywords
    argument: bool = False          # a click argument, not an option
    convert: Callable | None = None   # click's value -> the field's
    record: Callable | None = None    # (options, value) -> the results' entry
    restore: Callable | None = None   # the results' entry -> the field's
    cli_only: bool = False          # command line only: no RunOptions field
    recorded: bool = True           # False: a field the results file does not keep
    secret: bool = False            # recorded as given-or-not only (it may hold a password)

    def param(self, command):
        """``command`` with this option's click parameter added."""
        make = click.argument if self.argument else click.option
        return make(*self.decls, **self.click)(command)


def _tuple(value):
    return tuple(value or ())


OPTIONS = (
    Option("scenarios", ("scenarios",), (), "tuple", {"nargs": -1}, argument=True,
           convert=tuple, record=lambda opts, v: list(opts.names()), restore=_tuple),
    Option("quick", ("--quick",), False, "bool", {
        "is_flag": True, "help": "The quick slice of each scenario (make bench)."}),
    Option("transports", ("--transport", "transports"), (), "tuple", {
        "multiple": True, "metavar": "NAME",
        "help": "Keep cells over this transport (repeatable). Unreachable -> exit 2."},
        convert=tuple, restore=_tuple),
    Option("only", ("--only",), (), "tuple", {
        "multiple": True, "metavar": "KEY=VALUE",
        "help": "Keep cells whose param KEY equals VALUE (repeatable), e.g. api=kombu."},
        convert=parse_only, record=lambda opts, v: [f"{k}={x}" for k, x in v],
        restore=parse_only),
    Option("repeat", ("--repeat",), None, "int | None", {
        "type": click.IntRange(1, 1000),
        "help": "Rounds: every cell runs once per round (ABC ABC ABC); medians and "
                "spread over rounds. Default 3 with --quick, else 1."},
        record=lambda opts, v: opts.rounds()),
    Option("duration", ("--duration",), None, "float | None", {
        "type": float, "callback": cli_params.positive_float("--duration", "10"),
        "help": "Seconds of measurement per cell."}),
    Option("messages", ("--messages",), None, "int | None", {
        "type": click.IntRange(1, 100_000_000),
        "help": "Messages per cell (instead of --duration)."}),
    Option("rate", ("--rate",), None, "float | None", {
        "type": float, "callback": cli_params.positive_float("--rate", "2000"),
        "help": "Open loop: send at this many per second, latency from intended time."}),
    Option("warmup", ("--warmup",), None, "float | None", {
        "type": float, "callback": cli_params.seconds("--warmup", 3600, "1"),
        "help": "Seconds of warm-up before measuring."}),
    Option("timeout", ("--timeout",), 120.0, "float", {
        "type": float, "default": 120.0, "show_default": True,
        "callback": cli_params.positive_float("--timeout", "120"),
        "help": "Longest single wait, seconds."}),
    Option("serializers", ("--serializer", "serializers"), (), "tuple", {
        "multiple": True, "type": click.Choice(["json", "pickle", "msgpack", "yaml"]),
        "callback": cli_params.serializers,
        "help": "Serializers for publish/consume cells (default json; pickle only when "
                "named, and only that cell's consumer unpickles)."},
        convert=tuple, restore=_tuple),
    Option("payload_bytes", ("--payload-bytes",), None, "int | None", {
        "type": click.IntRange(0, 64 * 1024 * 1024),
        "help": "Message body size for publish cells (default 112)."}),
    Option("app", ("--app", "app"), None, "str | None", {
        "callback": cli_params.app_spec, "metavar": "MODULE:APP",
        "help": "Point the celery cells at your own app (and its broker)."}),
    Option("task", ("--task",), None, "str | None", {
        "metavar": "NAME", "help": "Task name the celery cells send (with --app)."}),
    Option("pool", ("--pool",), None, "str | None", {
        "type": click.Choice(["prefork", "solo", "threads", "eventlet", "gevent"]),
        "help": "Worker pool for worker scenarios (default: prefork; the worker "
                "scenario runs solo and prefork unless given)."}),
    Option("concurrency", ("--concurrency",), None, "int | None", {
        "type": click.IntRange(1, 256), "help": "Worker concurrency."}),
    Option("task_seconds", ("--task-seconds",), None, "float | None", {
        "type": float, "callback": cli_params.seconds("--task-seconds", 3600, "0.01"),
        "help": "Seconds each task sleeps in join cells."}),
    *(Option(f"{service}_url", (f"--{service}-url",), cli_only=True, click={
        "callback": cli_params.service_url(service), "expose_value": False,
        "help": f"{label} URL (env {config.ENV_VARS[service]})."})
      for service, label in (("redis", "Redis"), ("amqp", "RabbitMQ"),
                             ("postgres", "PostgreSQL"))),
    Option("out", ("--out",), None, "str | None", {
        "default": "results/latest.json", "show_default": True,
        "type": click.Path(dir_okay=False),
        "help": "Results file, rewritten after every cell."},
        restore=lambda v: None),   # re-measuring (the gate) never rewrites the original
    Option("quiet", ("--quiet",), False, "bool", {
        "is_flag": True, "help": "No progress bars: one plain line per cell."}),
    Option("rate_sweep", ("--rate-sweep",), (), "tuple", {
        "metavar": "START:STOP[:STEPS]",
        "help": "Open-loop rate ladder (geometric, 5 steps by default) for the rated "
                "scenarios (worker, publish): each step held --duration s, latency "
                "from the intended send time."},
        convert=cli_params.sweep, restore=_tuple),
    Option("max_rate", ("--max-rate",), False, "bool", {
        "is_flag": True,
        "help": "Find the highest rate each rated cell sustains: >= 98% of the rate "
                "achieved, no growing backlog, and --slo kept; confirmed by holding it."}),
    Option("slo", ("--slo",), None, "str | None", {
        "metavar": "pNN<=VALUE",
        "help": "What a sustainable rate keeps, e.g. 'p99<=10ms' (the default)."},
        convert=cli_params.slo),
    Option("html", ("--html/--no-html",), cli_only=True, click={
        "default": True, "show_default": True,
        "help": "Also write the HTML report next to --out (RESULTS.html)."}),
    Option("instructions", ("--instructions",), False, "bool", {
        "is_flag": True,
        "help": "Also count instructions per message of the in-process cells under "
                "valgrind's callgrind (deterministic where time is not)."}),
    Option("restart_cmd", ("--restart-cmd",), None, "str | None", {
        "metavar": "CMD",
        "help": "faults: shell command that restarts (or stops) a broker the harness did "
                "not start (RabbitMQ, a plugin transport's server), e.g. 'rabbitmqctl "
                "stop_app'; without it those broker-restart cells are skipped."},
        secret=True),
    Option("start_cmd", ("--start-cmd",), None, "str | None", {
        "metavar": "CMD",
        "help": "faults: shell command run after --restart-cmd to bring the broker back "
                "when --restart-cmd only stops it, e.g. 'rabbitmqctl start_app'."},
        secret=True),
    Option("cpus", ("--cpus",), None, "str | None", {
        "metavar": "ROLE=CPUS,...",
        "help": "Pin the publisher, the harness's broker, the worker's main process and "
                "its pool children (roles publisher, broker, worker, pool), e.g. "
                "'publisher=0,worker=1,pool=1' (docs/latency.md: placement)."},
        convert=cli_params.cpus),
    Option("variants", ("--variant", "variants"), cli_only=True, click={
        "multiple": True, "metavar": "NAME=SPEC",
        "help": "Measure every cell once per variant per round, counterbalanced (A B, "
                "B A, ...): SPEC is here, git:REV, pip:REQ,REQ, python:PATH, "
                "conf:KEY=VALUE,... or env:KEY=VALUE,... (docs/ab.md). Twice at least."}),
    Option("verbose", ("--verbose", "-v"), cli_only=True, click={
        "is_flag": True,
        "help": "Tables: each percentile's 95% interval in a column of its own."}),
    Option("workdir", default=None, annotation="Path | None", recorded=False),
)
FIELDS = tuple(o for o in OPTIONS if not o.cli_only)
CLI_ONLY = tuple(o.name for o in OPTIONS if o.cli_only)


def click_params(command):
    """``command`` with every declared click parameter, in the table's order (--help's)."""
    for option in reversed(OPTIONS):   # click decorators apply bottom-up
        if option.decls:
            command = option.param(command)
    return command


def _fields_from_table(cls):
    """``cls`` as a dataclass whose fields are :data:`FIELDS`, in their order."""
    cls.__annotations__ = {o.name: o.annotation for o in FIELDS}
    for o in FIELDS:
        setattr(cls, o.name, o.default)
    return dataclass(cls)


@_fields_from_table
class RunOptions:
    """What one run was asked: a field per entry of :data:`FIELDS` (see the module)."""

    @classmethod
    def from_cli(cls, given: dict) -> "RunOptions":
        """From ``run``'s click values (its command-line-only options removed)."""
        return cls(**{o.name: o.convert(given[o.name]) if o.convert else given[o.name]
                      for o in FIELDS if o.decls})

    def names(self) -> tuple:
        """The scenarios to run: those named, else every one not opt-in."""
        from . import scenarios

        names = tuple(self.scenarios) or tuple(
            n for n in scenarios.names() if not scenarios.get(n).opt_in
            and (scenarios.get(n).rated or not (self.rate_sweep or self.max_rate)))
        if self.instructions and INSTRUCTIONS not in names:
            names += (INSTRUCTIONS,)
        return names

    def rounds(self) -> int:
        if self.repeat:
            return max(1, int(self.repeat))
        return QUICK_ROUNDS if self.quick else 1

    @classmethod
    def from_dict(cls, d: dict) -> "RunOptions":
        """The options a results file recorded (unknown keys, from another version, ignored)."""
        d = d or {}
        kw = {o.name: d[o.name] for o in FIELDS if o.recorded and o.name in d}
        for o in FIELDS:
            if o.restore and o.recorded:
                kw[o.name] = o.restore(kw.get(o.name))
        return cls(**kw)

    def to_dict(self, secrets: bool = False) -> dict:
        """What the run was asked, for the results file (the gate re-measures from it).
        ``secrets``: keep the secret options' values (for a measuring child's stdin only,
        never a file)."""
        values = asdict(self)
        for o in FIELDS:
            if o.record:
                values[o.name] = o.record(self, values[o.name])
            if o.secret and values[o.name] and not secrets:
                values[o.name] = SECRET
        return {o.name: _listed(values[o.name]) for o in FIELDS if o.recorded}
