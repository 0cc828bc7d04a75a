"""Steering edits: immutable value objects whose fields are their constructor arguments.

An edit says *what* to do at one site; DESIGN §4 says what it means per token:

- ``Clamp``: rewrite one SAE feature (``set`` to v, ``add`` v, ``scale`` by v) and keep the
  SAE's reconstruction error, i.e. ``x' = x + (f' - f) @ W_dec``;
- ``AddVector``: ``x' = x + scale * vector``;
- ``Reconstruct``: replace ``x`` by ``f' @ W_dec + b_dec`` (the error term is dropped).

At one site additive edits apply first, then the SAE edits. A ``Steering`` groups edits
with the token scope they apply to. ``Steering.to_json`` / ``Steering.from_json`` carry a
steering as JSON text, the wire format for clients other than Python (schema in the README).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .wire import json_error, json_type, load_json

ClampMode = Literal["set", "add", "scale"]
CLAMP_MODES: tuple[str, ...] = ("set", "add", "scale")
TokenScope = Literal["all", "prompt", "generated"]
TOKEN_SCOPES: tuple[str, ...] = ("all", "prompt", "generated")


def _finite_float(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}.")
    try:
        number = float(value)
    except OverflowError:  # an int past float's range (JSON allows such literals)
        raise ValueError(f"{owner}: {name} must be finite, got an int too large for a float.") from None
    if not math.isfinite(number):
        raise ValueError(f"{owner}: {name} must be finite, got {value}. NaN/inf would poison the residual stream.")
    return number


def _choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{owner}: {name} must be a string, one of {choices}; got {type(value).__name__}.")
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}.")
    return value


def _site_name(owner: str, site: object) -> str:
    if not isinstance(site, str):
        raise TypeError(f"{owner}: site must be a string such as 'blocks.3.hook_resid_post', got {type(site).__name__}.")
    return site


@dataclass(frozen=True)
class Clamp:
    """Set, add to, or scale SAE feature ``feature`` at ``site``, keeping the SAE error term."""

    site: str
    feature: int
    value: float
    mode: ClampMode = "set"

    def __post_init__(self) -> None:
        _site_name("Clamp", self.site)
        if isinstance(self.feature, bool) or not isinstance(self.feature, int):
            raise TypeError(f"Clamp: feature must be an int index, got {type(self.feature).__name__}.")
        if self.feature < 0:
            raise ValueError(f"Clamp: feature must be >= 0, got {self.feature}.")
        object.__setattr__(self, "value", _finite_float("Clamp", "value", self.value))
        _choice("Clamp", "mode", self.mode, CLAMP_MODES)


@dataclass(frozen=True, eq=False)
class AddVector:
    """Add ``scale * vector`` to the residual-stream tensor at ``site``.

    The vector is copied at construction, so later changes to the caller's tensor do not
    leak into a steering that is already in use.
    """

    site: str
    vector: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        _site_name("AddVector", self.site)
        if not isinstance(self.vector, torch.Tensor):
            raise TypeError(f"AddVector: vector must be a torch.Tensor, got {type(self.vector).__name__}.")
        if not self.vector.is_floating_point():
            raise TypeError(
                f"AddVector: vector must be a floating point tensor, got dtype {self.vector.dtype}; "
                "it is added to the residual stream. Convert it with .float()."
            )
        if self.vector.dim() != 1:
            raise ValueError(f"AddVector: vector must be 1-D [d_model], got shape {tuple(self.vector.shape)}.")
        if not bool(torch.isfinite(self.vector).all()):
            raise ValueError("AddVector: vector must have no NaN or inf; they would poison the residual stream.")
        object.__setattr__(self, "vector", self.vector.detach().clone())
        object.__setattr__(self, "scale", _finite_float("AddVector", "scale", self.scale))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AddVector):
            return NotImplemented
        return (
            self.site == other.site
            and self.scale == other.scale
            and self.vector.shape == other.vector.shape
            and bool(torch.equal(self.vector.cpu(), other.vector.cpu()))
        )

    def __hash__(self) -> int:
        return hash((AddVector, self.site, self.scale, tuple(self.vector.shape)))


@dataclass(frozen=True)
class Reconstruct:
    """Replace the tensor at ``site`` by its SAE reconstruction (with any clamps applied)."""

    site: str

    def __post_init__(self) -> None:
        _site_name("Reconstruct", self.site)


Edit = Clamp | AddVector | Reconstruct
EDIT_TYPES = (Clamp, AddVector, Reconstruct)


@dataclass(frozen=True, init=False)
class Steering:
    """A set of edits applied together to the tokens selected by ``tokens``.

    ``tokens="prompt"`` steers positions before the row's prompt length, ``"generated"``
    the positions at or after it, ``"all"`` every position. Padding is never steered.
    """

    edits: tuple[Edit, ...] = field(default=())
    tokens: TokenScope = "all"

    def __init__(self, *edits: Edit, tokens: TokenScope = "all") -> None:
        for edit in edits:
            if not isinstance(edit, EDIT_TYPES):
                raise TypeError(
                    f"Steering: every edit must be a Clamp, AddVector or Reconstruct, got {type(edit).__name__}."
                )
        _choice("Steering", "tokens", tokens, TOKEN_SCOPES)
        object.__setattr__(self, "edits", tuple(edits))
        object.__setattr__(self, "tokens", tokens)

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites these edits touch, in first-mention order."""
        return tuple(dict.fromkeys(edit.site for edit in self.edits))

    def to_json(self) -> str:
        """This steering as JSON text; ``Steering.from_json`` reads it back to an equal steering.

        Schema: ``{"tokens": ..., "edits": [...]}``, each edit an object with a ``"type"`` of
        ``"clamp"``, ``"add_vector"`` or ``"reconstruct"`` and the constructor's fields (an
        ``AddVector`` vector as a list of floats). Every field is written, defaults included.
        """
        edits = [_edit_to_json(edit) for edit in self.edits]
        return json.dumps({"tokens": self.tokens, "edits": edits}, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> Steering:
        """Parse the JSON text written by ``to_json`` (or by any client that follows its schema).

        ``tokens`` defaults to ``"all"``, a clamp's ``mode`` to ``"set"``, a vector's ``scale``
        to 1.0. Vectors come back as float32 tensors on the CPU: a float32 vector round-trips
        bit-exactly, a float64 one is rounded. Any malformed input (bad JSON, unknown or
        missing keys, wrong types, NaN/inf, values the edit constructors reject) raises a
        ``ValueError`` whose message starts with ``"steering JSON: "`` and names the edit.
        """
        data = _load_json_object(text)
        unknown = sorted(set(data) - {"tokens", "edits"})
        if unknown:
            raise _json_error(f"unknown top-level key(s) {_quoted(unknown)}; allowed: 'tokens', 'edits'.")
        if "edits" not in data:
            raise _json_error("missing top-level key 'edits' (a list of edit objects; [] for none).")
        raw_edits = data["edits"]
        if not isinstance(raw_edits, list):
            raise _json_error(f"'edits' must be a list of edit objects, got {json_type(raw_edits)}.")
        edits = [_edit_from_json(index, raw) for index, raw in enumerate(raw_edits)]
        try:
            return cls(*edits, tokens=data.get("tokens", "all"))
        except (TypeError, ValueError) as exc:
            raise _json_error(str(exc)) from exc


# --- JSON wire format ------------------------------------------------------------------

# Per edit type: its class, required fields, and optional fields with their defaults.
_JSON_EDITS: dict[str, tuple[type, tuple[str, ...], dict[str, object]]] = {
    "clamp": (Clamp, ("site", "feature", "value"), {"mode": "set"}),
    "add_vector": (AddVector, ("site", "vector"), {"scale": 1.0}),
    "reconstruct": (Reconstruct, ("site",), {}),
}


def _json_error(message: str) -> ValueError:
    return json_error("steering", message)


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _load_json_object(text: object) -> dict[str, object]:
    data = load_json("steering", text)
    if not isinstance(data, dict):
        raise _json_error(f"the top level must be an object, got {json_type(data)}.")
    return data


def _edit_to_json(edit: Edit) -> dict[str, object]:
    if isinstance(edit, Clamp):
        return {"type": "clamp", "site": edit.site, "feature": edit.feature, "value": edit.value, "mode": edit.mode}
    if isinstance(edit, AddVector):
        # float() of a float32 element is exact, and json writes floats with repr, which
        # reads back to the same double: so the float32 rebuilt by from_json is bit-exact.
        values = [float(v) for v in edit.vector.detach().cpu().tolist()]
        return {"type": "add_vector", "site": edit.site, "vector": values, "scale": edit.scale}
    return {"type": "reconstruct", "site": edit.site}


def _edit_type(where: str, raw: dict[str, object]) -> str:
    kinds = _quoted(list(_JSON_EDITS))
    if "type" not in raw:
        raise _json_error(f"{where}: missing 'type'; expected one of {kinds}.")
    kind = raw["type"]
    if not isinstance(kind, str) or kind not in _JSON_EDITS:
        shown = repr(kind) if isinstance(kind, str) else json_type(kind)
        raise _json_error(f"{where}: unknown type {shown}; expected one of {kinds}.")
    return kind


def _edit_from_json(index: int, raw: object) -> Edit:
    where = f"edits[{index}]"
    if not isinstance(raw, dict):
        raise _json_error(f"{where}: an edit must be an object, got {json_type(raw)}.")
    kind = _edit_type(where, raw)
    edit_class, required, optional = _JSON_EDITS[kind]
    fields = {key: value for key, value in raw.items() if key != "type"}
    missing = [name for name in required if name not in fields]
    if missing:
        raise _json_error(f"{where}: {kind} edit is missing field(s) {_quoted(missing)}.")
    unknown = sorted(set(fields) - set(required) - set(optional))
    if unknown:
        allowed = _quoted(["type", *required, *optional])
        raise _json_error(f"{where}: {kind} edit has unknown field(s) {_quoted(unknown)}; allowed: {allowed}.")
    kwargs = {**optional, **fields}
    if kind == "add_vector":
        kwargs["vector"] = _vector_from_json(where, kwargs["vector"])
    try:
        return edit_class(**kwargs)
    except (TypeError, ValueError) as exc:  # the constructors' own checks, e.g. feature >= 0
        raise _json_error(f"{where}: {exc}") from exc


def _vector_from_json(where: str, raw: object) -> torch.Tensor:
    if not isinstance(raw, list):
        raise _json_error(f"{where}: vector must be a list of numbers, got {json_type(raw)}.")
    if not raw:
        raise _json_error(f"{where}: vector must not be empty.")
    values: list[float] = []
    for position, element in enumerate(raw):
        if isinstance(element, bool) or not isinstance(element, (int, float)):
            raise _json_error(f"{where}: vector[{position}] must be a number, got {json_type(element)}.")
        try:
            values.append(float(element))
        except OverflowError:  # an integer literal past float's range
            raise _json_error(f"{where}: vector[{position}] is too large for a float32.") from None
    vector = torch.tensor(values, dtype=torch.float32)
    finite = torch.isfinite(vector)
    if not bool(finite.all()):
        position = int((~finite).nonzero()[0, 0])
        raise _json_error(f"{where}: vector[{position}] = {values[position]!r} is too large for a float32.")
    return vector
