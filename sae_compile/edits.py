"""Steering edits: immutable value objects whose fields are their constructor arguments.

An edit says *what* to do at one site; DESIGN §4 says what it means per token:

- ``Clamp``: rewrite one SAE feature (``set`` to v, ``add`` v, ``scale`` by v) and keep the
  SAE's reconstruction error, i.e. ``x' = x + (f' - f) @ W_dec``;
- ``AddVector``: ``x' = x + scale * vector``;
- ``Reconstruct``: replace ``x`` by ``f' @ W_dec + b_dec`` (the error term is dropped).

At one site additive edits apply first, then the SAE edits. A ``Steering`` groups edits
with the token scope they apply to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

ClampMode = Literal["set", "add", "scale"]
CLAMP_MODES: tuple[str, ...] = ("set", "add", "scale")
TokenScope = Literal["all", "prompt", "generated"]
TOKEN_SCOPES: tuple[str, ...] = ("all", "prompt", "generated")


def _finite_float(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}. NaN/inf would poison the residual stream.")
    return float(value)


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
