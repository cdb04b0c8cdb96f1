"""Options declared once, in dataclasses: each field carries its help text and its valid range, so validation,
``--set key=value`` parsing, ``--help`` and the run folder's config.json all come from the same declaration."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, field, fields

from .errors import DfadError


def option(default, help: str, *, min: float | None = None, max: float | None = None, above: float | None = None,
           below: float | None = None, choices: tuple | None = None, words: tuple[str, ...] = (), factory=None,
           split: bool = False):
    """A dataclass field with its help text and valid range: ``min``/``max`` are inclusive, ``above``/``below``
    exclusive. ``words``: names a number option also takes (``auto``), its type then ``float | str``. ``factory``
    makes a mutable default. ``split``: a count for the whole run (a batch size, a pool's capacity) that the ranks of
    a torchrun run share equally (dfad_edge.distributed.split_across_ranks)."""
    metadata = {"help": help, "min": min, "max": max, "above": above, "below": below, "choices": choices,
                "words": words, "split": split}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _range_problem(value, meta: dict) -> str | None:
    if meta.get("choices") and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}"
    if isinstance(value, str) and meta.get("words"):
        return None if value in meta["words"] else f"must be a number or {' or '.join(meta['words'])}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    for key, test, words in (("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
                             ("above", lambda v, b: v > b, ">"), ("below", lambda v, b: v < b, "<")):
        bound = meta.get(key)
        if bound is not None and not test(value, bound):
            return f"must be {words} {bound}"
    return None


def validate_options(config, prefix: str = "") -> None:
    """One clear line for the first option out of its range, naming it the way --set names it."""
    for item in fields(config):
        value = getattr(config, item.name)
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        for element in values:
            problem = _range_problem(element, item.metadata)
            if problem:
                raise DfadError(f"{prefix}{item.name} {problem}, got {value!r} (see dfad-edge distill --help)")


def option_help(cls, prefix: str = "") -> list[str]:
    """One line per option: key=default, help, range."""
    lines = []
    for item in fields(cls):
        default = item.default if item.default is not MISSING else item.default_factory()
        meta = item.metadata
        bounds = [f"{word} {meta[key]}" for key, word in (("min", ">="), ("above", ">"), ("max", "<="), ("below", "<"))
                  if meta.get(key) is not None]
        if meta.get("choices"):
            bounds.append("one of " + "|".join(map(str, meta["choices"])))
        if meta.get("words"):
            bounds.append("or " + "|".join(meta["words"]))
        if meta.get("split"):
            bounds.append("the whole run's: torchrun ranks take equal shares")
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        lines.append(f"{prefix}{item.name}={shown}: {meta.get('help', '')}" + (f" ({'; '.join(bounds)})" if bounds else ""))
    return lines


def _parse_scalar(text: str, kind, key: str):
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise DfadError(f"--set {key}={text}: expected true or false")
    try:
        return kind(text)
    except ValueError:
        raise DfadError(f"--set {key}={text}: expected {kind.__name__}") from None


def parse_value(cls, name: str, text: str, key: str):
    """A --set value in the field's own type: int, float, bool, str, an optional one ('none'), a tuple ('1,2'), or a
    number that also takes names (its ``words``: 'auto')."""
    kind = typing.get_type_hints(cls)[name]
    args = typing.get_args(kind)
    words = next(item.metadata.get("words", ()) for item in fields(cls) if item.name == name)
    if words:
        if text.lower() in words:
            return text.lower()
        try:
            return float(text)
        except ValueError:
            raise DfadError(f"--set {key}={text}: expected a number or {' or '.join(words)}") from None
    if type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:
        element = args[0] if args else str
        return tuple(_parse_scalar(part.strip(), element, key) for part in text.split(",") if part.strip())
    return _parse_scalar(text, kind, key)


def field_names(cls) -> set[str]:
    return {item.name for item in fields(cls)}


def replace_options(config, changes: dict):
    return dataclasses.replace(config, **changes) if changes else config


def from_plain(cls, data: dict):
    """A dataclass from its JSON form; tuples come back as tuples, unknown keys are refused."""
    unknown = set(data) - field_names(cls)
    if unknown:
        raise DfadError(f"unknown option(s) {', '.join(sorted(unknown))} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        origin = typing.get_origin(hints[name])
        is_tuple = origin is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hints[name]))
        values[name] = tuple(value) if is_tuple and isinstance(value, list) else value
    return cls(**values)
