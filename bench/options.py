"""One small ``parse_*`` function per kind of option value, as pytest-benchmark has.

Each takes the text (or the value click already converted) and the option's name,
and returns the value or raises :class:`ValueError` with what was wrong and what to
write instead; the CLI turns that into one line naming the option, exit 2, before
anything is measured. ``inf`` and ``nan`` are refused wherever a number of seconds or
a rate is asked for (Python's ``float()`` accepts both).
"""
from __future__ import annotations

import math

from . import config


def parse_float(value, option: str, *, minimum: float = 0.0, open_min: bool = True,
                maximum: float | None = None, example: str = "") -> float:
    """A finite number above ``minimum`` (or at least it, ``open_min=False``) and at most
    ``maximum``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number{_eg(option, example)}") from None
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"must be a finite number, got {value}{_eg(option, example)}")
    low_ok = number > minimum if open_min else number >= minimum
    if not low_ok:
        raise ValueError(f"must be {'>' if open_min else '>='} {minimum:g}, got "
                         f"{number:g}{_eg(option, example)}")
    if maximum is not None and number > maximum:
        raise ValueError(f"must be at most {maximum:g}, got {number:g}{_eg(option, example)}")
    return number


def parse_positive_float(value, option: str, example: str = "") -> float:
    """Seconds, a rate: finite and > 0."""
    return parse_float(value, option, example=example)


def parse_seconds(value, option: str, maximum: float | None = None,
                  example: str = "") -> float:
    """A duration that may be 0 (no warm-up, tasks that do not sleep): finite, >= 0."""
    return parse_float(value, option, open_min=False, maximum=maximum, example=example)


def _eg(option: str, example: str) -> str:
    return f", e.g. {option} {example}" if example else ""


def parse_service_url(service: str, value: str, option: str) -> str:
    """A URL for ``service`` (redis, amqp, postgres): see :func:`bench.config.check_url`.
    The message quotes the URL with its password masked."""
    try:
        return config.check_url(service, value, option)
    except config.UsageError as exc:
        raise ValueError(str(exc).removeprefix(f"{option} ")) from None


def parse_app_spec(value: str) -> str:
    """``MODULE:APP``, e.g. ``proj.celery:app``: dotted Python names on both sides."""
    module, sep, attr = value.partition(":")
    names = module.split(".") + attr.split(".")
    if not sep or not all(n.isidentifier() for n in names):
        raise ValueError(f"{value!r}: expected MODULE:APP, e.g. proj.celery:app")
    return value


def parse_serializer(value: str) -> str:
    """A serializer Kombu can encode with here (msgpack and yaml need their packages)."""
    from kombu.exceptions import SerializerNotInstalled
    from kombu.serialization import dumps

    try:
        dumps({"probe": 1}, serializer=value)
    except SerializerNotInstalled:
        package = {"yaml": "PyYAML"}.get(value, value)
        raise ValueError(f"{value}: not installed here; pip install {package}, or use "
                         f"json") from None
    except Exception as exc:  # an unknown name
        raise ValueError(f"{value}: {exc}") from None
    return value
