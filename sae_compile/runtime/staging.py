"""Turn user steerings into row edits, validating everything before anything is written.

``stage_row`` is pure: it reads the site states, writes nothing, and raises ValueError or
TypeError for any bad input. Writing is the slot manager's job, after staging succeeded,
so a rejected call leaves the steering state exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..edits import EDIT_TYPES, AddVector, Clamp, Edit, Reconstruct, Steering
from .state import RowEdits, SiteState

SteeringArg = Steering | Sequence[Edit] | Sequence["Steering | None"] | None


def per_row_steerings(steering: SteeringArg, batch: int) -> list[Steering | None]:
    """Normalise the ``steering=`` argument to one ``Steering`` or ``None`` per batch row.

    Accepted: ``None``; a ``Steering``; a list of edits (one Steering for every row); a list
    of ``Steering``/``None``, one per row. An empty list is a list of no edits, so it steers
    no row, the same as ``None``. Raises TypeError for anything else and ValueError for a
    per-row list whose length is not ``batch``.
    """
    if steering is None or isinstance(steering, Steering):
        return [steering] * batch
    if not isinstance(steering, (list, tuple)):
        raise TypeError(
            f"steering must be None, a Steering, a list of edits, or a per-row list; got {type(steering).__name__}."
        )
    if not steering:
        return [None] * batch
    if all(isinstance(e, EDIT_TYPES) for e in steering):
        return [Steering(*steering)] * batch
    if all(s is None or isinstance(s, Steering) for s in steering):
        if len(steering) != batch:
            raise ValueError(
                f"steering: a per-row list must have one Steering-or-None per batch row; got "
                f"{len(steering)} entries for a batch of {batch}. Pass a single Steering to steer every row."
            )
        return list(steering)
    kinds = ", ".join(sorted({type(e).__name__ for e in steering}))
    raise TypeError(
        "steering: a list must hold either edits (Clamp/AddVector/Reconstruct) or one Steering-or-None "
        f"per batch row, not a mix; got {kinds}. Wrap each row's edits in sc.Steering(...)."
    )


@dataclass
class _Draft:
    """One row's edits gathered per canonical site name, before they become ``RowEdits``."""

    adds: dict[str, torch.Tensor] = field(default_factory=dict)  # [D] fp64, sum of scale * vector
    clamps: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)  # feature -> (mul, shift)
    reconstruct: set[str] = field(default_factory=set)


def stage_row(steering: Steering, sites: dict[str, SiteState], resolve: Callable[[str], str]) -> dict[str, RowEdits]:
    """Validate ``steering`` against the attached ``sites`` and compile it to per-site row edits.

    ``resolve`` maps a user-facing site name to an attached site's canonical name, or
    raises ValueError naming the available sites. Reads the sites, writes nothing.
    """
    draft = _Draft()
    for edit in steering.edits:
        name = resolve(edit.site)
        if isinstance(edit, AddVector):
            _stage_add(draft, name, edit, sites[name])
        elif isinstance(edit, Reconstruct):
            _require_sae(edit, sites[name])
            draft.reconstruct.add(name)
        else:
            _stage_clamp(draft, name, edit, sites[name])
    names = dict.fromkeys([*draft.adds, *draft.clamps, *draft.reconstruct])
    return {name: _row_edits(draft, name) for name in names}


def _stage_add(draft: _Draft, name: str, edit: AddVector, state: SiteState) -> None:
    if edit.vector.shape[0] != state.width:
        raise ValueError(
            f"AddVector at {edit.site!r}: vector has length {edit.vector.shape[0]} but the tensor "
            f"there is {state.width} wide."
        )
    # Sum in fp64 on the host so several vectors at one site round once, not per add.
    vec = edit.scale * edit.vector.detach().to("cpu", torch.float64)  # [D]
    draft.adds[name] = draft.adds[name] + vec if name in draft.adds else vec


def _require_sae(edit: Clamp | Reconstruct, state: SiteState) -> None:
    if state.d_sae == 0:
        raise ValueError(
            f"{type(edit).__name__} at {edit.site!r}: no SAE is attached there (it was attached for "
            "additive steering only). Pass an SAE for this site to sc.steer()."
        )


def _stage_clamp(draft: _Draft, name: str, edit: Clamp, state: SiteState) -> None:
    _require_sae(edit, state)
    if edit.feature >= state.d_sae:
        raise ValueError(
            f"Clamp at {edit.site!r}: feature {edit.feature} is out of range; the SAE there has "
            f"d_sae={state.d_sae} features (valid: 0..{state.d_sae - 1})."
        )
    site_clamps = draft.clamps.setdefault(name, {})
    site_clamps[edit.feature] = _compose(*site_clamps.get(edit.feature, (1.0, 0.0)), edit)
    if len(site_clamps) > state.capacity.max_clamps:
        raise ValueError(
            f"steering clamps {len(site_clamps)} features at {edit.site!r} but max_clamps="
            f"{state.capacity.max_clamps}. Pass a larger max_clamps to sc.steer()."
        )


def _row_edits(draft: _Draft, name: str) -> RowEdits:
    add = draft.adds.get(name)
    if add is not None:
        add = add.float()  # [D] fp32, as RowEdits carries it
        if not bool(torch.isfinite(add).all()):
            raise ValueError(
                f"AddVector at {name!r}: the summed scale * vector overflows float32, and inf would "
                "poison the residual stream. Use a smaller scale or vector."
            )
    site_clamps = draft.clamps.get(name, {})
    return RowEdits(
        add=add,
        features=tuple(site_clamps),
        mul=tuple(m for m, _ in site_clamps.values()),
        shift=tuple(s for _, s in site_clamps.values()),
        reconstruct=name in draft.reconstruct,
    )


def _compose(mul: float, shift: float, clamp: Clamp) -> tuple[float, float]:
    """Follow ``f -> mul * f + shift`` by ``clamp``: clamps on one feature apply in order."""
    if clamp.mode == "set":
        return 0.0, clamp.value
    if clamp.mode == "add":
        return mul, shift + clamp.value
    return mul * clamp.value, shift * clamp.value
