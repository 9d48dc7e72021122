"""The checks behind ``celery-bench``'s options, shared by its commands: click callbacks
that turn a bad value into one line naming the option (exit 2, before anything is
measured), and the checks of paths, rate specs and results files the commands make.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from . import config, options


def positive_float(name, example=""):
    """A finite number > 0 (inf and nan refused): seconds, a rate."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return options.parse_positive_float(value, name, example)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=name) from None
    return parse


def seconds(name, maximum=None, example=""):
    """A finite number of seconds >= 0 (0: none), at most ``maximum``."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return options.parse_seconds(value, name, maximum, example)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=name) from None
    return parse


def finite_range(name, low, high):
    """A finite number from ``low`` to ``high`` (click's FloatRange lets nan through)."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return options.parse_float(value, name, minimum=low, open_min=False, maximum=high)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=name) from None
    return parse


def service_url(service):
    """The flag's URL, checked and set for this process and its workers; without the
    flag, the environment variable's URL is checked here too (before anything runs)."""
    def parse(ctx, param, value):
        if value is None:
            config.service_url(service)  # a bad CELERY_BENCH_*_URL: one line, exit 2
            return None
        name = param.opts[0]
        try:
            options.parse_service_url(service, value, name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=name) from None
        config.set_service_url(service, value, name)
        return value
    return parse


def app_spec(ctx, param, value):
    if value is None:
        return None
    try:
        return options.parse_app_spec(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--app") from None


def serializers(ctx, param, values):
    """Each --serializer must be installed here (pickle only when named: JSON otherwise)."""
    try:
        return tuple(options.parse_serializer(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--serializer") from None


def sweep(text):
    from .maxrate import SpecError, parse_sweep

    if text is None:
        return ()
    try:
        return parse_sweep(text)
    except SpecError as exc:
        raise config.UsageError(f"--rate-sweep {exc}") from None


def slo(text):
    from .maxrate import SLO, SpecError

    if text is None:
        return None
    try:
        return SLO.parse(text).text
    except SpecError as exc:
        raise config.UsageError(f"--slo {exc}") from None


def check_writable(path: str, option: str, folder: bool = False) -> None:
    """Fail before measuring, not after: one line naming the option, exit 2.
    ``folder``: ``path`` is a folder to write files in (made if missing)."""
    target = Path(path)
    if folder:
        if target.exists() and not target.is_dir():
            raise config.UsageError(f"{option} {path}: is a file; give a folder")
    elif target.exists() and target.is_dir():
        raise config.UsageError(f"{option} {path}: is a folder; give a file path")
    folder = target if folder else (target.parent if str(target.parent) else Path("."))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".celery-bench-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise config.UsageError(f"{option} {path}: cannot write there "
                                f"({exc.strerror or exc}); choose a writable path") from None


def load(path, results):
    try:
        return results.load(path)
    except FileNotFoundError:
        raise config.UsageError(f"{path}: no such results file (run 'celery-bench run' first)")
    except (OSError, ValueError) as exc:
        raise config.UsageError(f"{path}: not a celery-bench results file ({exc})")


def selectors(values, option="--cell"):
    from .compare import parse_selector

    try:
        return [parse_selector(v) for v in values]
    except ValueError as exc:
        raise config.UsageError(f"{option}: {exc}")


def cpus(text):
    """--cpus ROLE=CPUS,...: checked here (one line, exit 2), handed on as given."""
    from .placement import parse_cpus

    if text is None:
        return None
    try:
        parse_cpus(text)
    except ValueError as exc:
        raise config.UsageError(f"--cpus {exc}") from None
    return text
