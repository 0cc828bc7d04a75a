"""Strict JSON text for the wire formats that clients other than Python send: a steering
(``Steering.to_json``) and a record request (``features_to_json``).

Python's ``json`` takes more than standard JSON: NaN and Infinity literals, numbers past a
float's range, and duplicate keys (parsers disagree on which one wins). Each is refused here,
with a ``ValueError`` whose message starts with the format's name, e.g. ``"steering JSON: "``.
"""

from __future__ import annotations

import json
import math


class _Refused(Exception):
    """A literal that standard JSON does not have, raised from inside the parser."""


def json_error(what: str, message: str) -> ValueError:
    """The error of a malformed ``what`` text (``"steering"``, ``"record"``)."""
    return ValueError(f"{what} JSON: {message}")


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages a non-Python client can read."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    return names.get(type(value), type(value).__name__)


def load_json(what: str, text: object) -> object:
    """The value of the JSON ``text``; ValueError (``"{what} JSON: ..."``) for anything else."""
    if not isinstance(text, str):
        raise json_error(what, f"expected the JSON text as a str, got {type(text).__name__}.")
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise json_error(what, f"not valid JSON: {exc}.") from exc
    except _Refused as exc:
        raise json_error(what, str(exc)) from None


def _reject_constant(name: str) -> float:
    raise _Refused(f"{name} is not allowed: numbers must be finite.")


def _finite_float(literal: str) -> float:
    number = float(literal)
    if not math.isfinite(number):  # e.g. 1e400, which float() turns into inf
        raise _Refused(f"number {literal} is too large for a float: numbers must be finite.")
    return number


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _Refused(f"duplicate key {key!r} in an object.")
        result[key] = value
    return result
