"""Checks for the config dataclasses: a bad setting fails when the config is made, naming the field.

A typo such as ``steps=0`` or ``batch_size=0`` used to travel far before it broke something
(``KeyError`` on an empty log, ``ZeroDivisionError`` in a mean), and ``kl_coef=nan`` never broke anything
visibly. Each config in ``sawyer.presets`` calls these from ``__post_init__``, which also runs on
``dataclasses.replace``, so a notebook override is checked at the line that makes it::

    SawyerPPOConfig.steps must be an integer >= 1, got 0

Every check takes the config and field names, reads the values with ``getattr``, and raises ``ConfigError``
(a ``ValueError``) whose message is ``<Class>.<field> must be <allowed range>, got <value>``.
"""
from __future__ import annotations

import math
import os


class ConfigError(ValueError):
    """A config field holds a value outside its allowed range; the message names the class and the field."""


def _fail(cfg, name: str, expected: str, value=None):
    value = getattr(cfg, name) if value is None else value
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise ConfigError(f"{type(cfg).__name__}.{name} must be {expected}, got {shown}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(cfg, *names: str, low: int = 1, optional: bool = False) -> None:
    """Each field is an integer ``>= low`` (``None`` also allowed with ``optional``, meaning "no cap")."""
    for name in names:
        v = getattr(cfg, name)
        if optional and v is None:
            continue
        if not (_is_int(v) and v >= low):
            _fail(cfg, name, f"{'None or ' if optional else ''}an integer >= {low}")


def steps_or_epochs(cfg, *names: str) -> None:
    """``max_steps``-style fields: ``-1`` (run the epochs) or an integer ``>= 1``."""
    for name in names:
        v = getattr(cfg, name)
        if not (_is_int(v) and (v == -1 or v >= 1)):
            _fail(cfg, name, "-1 (run the epochs) or an integer >= 1")


def number(cfg, *names: str, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> None:
    """Each field is a finite number in the range; ``low_open``/``high_open`` exclude that end.

    ``number(cfg, "learning_rate", low=0, low_open=True)`` reads "a finite number > 0".
    """
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    expected = "a finite number" + (" " + " and ".join(parts) if parts else "")
    if low is not None and high is not None:
        expected = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    for name in names:
        v = getattr(cfg, name)
        ok = _is_number(v)
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if not ok:
            _fail(cfg, name, expected)


def text(cfg, *names: str) -> None:
    """Each field is a non-empty string (a model id, a dataset, a label); a ``pathlib.Path`` folder also passes."""
    for name in names:
        v = getattr(cfg, name)
        if not (isinstance(v, (str, os.PathLike)) and str(v).strip()):
            _fail(cfg, name, "a non-empty string")


def texts(cfg, name: str) -> None:
    """The field is a non-empty tuple/list of non-empty strings. A bare string is refused: iterating it would
    treat each character as a dataset."""
    v = getattr(cfg, name)
    if isinstance(v, str) or not isinstance(v, (tuple, list)) or not v or \
            not all(isinstance(x, str) and x.strip() for x in v):
        _fail(cfg, name, "a non-empty tuple of non-empty strings (use a 1-tuple for one: ('data/x',))")


def choice(cfg, name: str, allowed) -> None:
    """The field is one of ``allowed``."""
    if getattr(cfg, name) not in allowed:
        _fail(cfg, name, "one of " + ", ".join(repr(a) for a in allowed))


def flag(cfg, *names: str) -> None:
    """Each field is ``True`` or ``False`` (``"false"`` from a command line would otherwise be truthy)."""
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            _fail(cfg, name, "True or False")


def instance(cfg, name: str, cls: type) -> None:
    """The field is a ``cls`` (e.g. a stage config inside a preset, where a sibling class is an easy mix-up)."""
    if not isinstance(getattr(cfg, name), cls):
        _fail(cfg, name, f"a {cls.__name__}", type(getattr(cfg, name)).__name__)
