"""Turn user steerings into row edits, validating everything before anything is written.

``stage_row`` is pure: it reads the site states, writes nothing, and raises ValueError or
TypeError for any bad input. Writing is the slot manager's job, after staging succeeded,
so a rejected call leaves the steering state exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..edits import AddVector, Clamp, Edit, Reconstruct, Steering
from .state import RowEdits, SiteState

SteeringArg = Steering | Sequence[Edit] | Sequence["Steering | None"] | None


def per_row_steerings(steering: SteeringArg, batch: int) -> list[Steering | None]:
    """Normalise the ``steering=`` argument to one ``Steering`` or ``None`` per batch row.

    Accepted: ``None``; a ``Steering``; a list of edits (one Steering for every row); a list
    of ``Steering``/``None``, one per row.
    """
    if steering is None or isinstance(steering, Steering):
        return [steering] * batch
    if isinstance(steering, (list, tuple)):
        if all(isinstance(e, (Clamp, AddVector, Reconstruct)) for e in steering) and steering:
            return [Steering(*steering)] * batch
        if all(s is None or isinstance(s, Steering) for s in steering):
            if len(steering) != batch:
                raise ValueError(
                    f"steering: a per-row list must have one Steering-or-None per batch row; got "
                    f"{len(steering)} entries for a batch of {batch}. Pass a single Steering to steer every row."
                )
            return list(steering)
        raise TypeError(
            "steering: a list must hold either edits (Clamp/AddVector/Reconstruct) or one Steering-or-None "
            "per batch row, not a mix."
        )
    raise TypeError(
        f"steering must be None, a Steering, a list of edits, or a per-row list; got {type(steering).__name__}."
    )


def stage_row(steering: Steering, sites: dict[str, SiteState], resolve: Callable[[str], str]) -> dict[str, RowEdits]:
    """Validate ``steering`` against the attached ``sites`` and compile it to per-site row edits.

    ``resolve`` maps a user-facing site name to an attached site's canonical name, or
    raises ValueError naming the available sites. Reads the sites, writes nothing.
    """
    adds: dict[str, torch.Tensor] = {}
    clamps: dict[str, dict[int, tuple[float, float]]] = {}
    reconstruct: set[str] = set()
    for edit in steering.edits:
        name = resolve(edit.site)
        state = sites[name]
        if isinstance(edit, AddVector):
            if edit.vector.shape[0] != state.hidden_size:
                raise ValueError(
                    f"AddVector at {edit.site!r}: vector has length {edit.vector.shape[0]} but the residual "
                    f"stream there has d_model={state.hidden_size}."
                )
            vec = edit.scale * edit.vector.detach().to("cpu", torch.float64)
            adds[name] = adds[name] + vec if name in adds else vec
            continue
        if state.d_sae == 0:
            raise ValueError(
                f"{type(edit).__name__} at {edit.site!r}: no SAE is attached there (it was attached for "
                "additive steering only). Pass an SAE for this site to sc.steer()."
            )
        if isinstance(edit, Reconstruct):
            reconstruct.add(name)
            continue
        if edit.feature >= state.d_sae:
            raise ValueError(
                f"Clamp at {edit.site!r}: feature {edit.feature} is out of range; the SAE there has "
                f"d_sae={state.d_sae} features (valid: 0..{state.d_sae - 1})."
            )
        site_clamps = clamps.setdefault(name, {})
        mul, shift = site_clamps.get(edit.feature, (1.0, 0.0))
        site_clamps[edit.feature] = _compose(mul, shift, edit)
        if len(site_clamps) > state.capacity.max_clamps:
            raise ValueError(
                f"steering clamps {len(site_clamps)} features at {edit.site!r} but max_clamps="
                f"{state.capacity.max_clamps}. Pass a larger max_clamps to sc.steer()."
            )
    out: dict[str, RowEdits] = {}
    for name in set(adds) | set(clamps) | reconstruct:
        site_clamps = clamps.get(name, {})
        add = adds.get(name)
        out[name] = RowEdits(
            add=None if add is None else add.float(),
            features=tuple(site_clamps),
            mul=tuple(m for m, _ in site_clamps.values()),
            shift=tuple(s for _, s in site_clamps.values()),
            reconstruct=name in reconstruct,
        )
        if add is not None and not bool(torch.isfinite(out[name].add).all()):
            raise ValueError(f"AddVector at {name!r}: the summed scale * vector overflows float32.")
    return out


def _compose(mul: float, shift: float, clamp: Clamp) -> tuple[float, float]:
    """Follow ``f -> mul * f + shift`` by ``clamp``: clamps on one feature apply in order."""
    if clamp.mode == "set":
        return 0.0, clamp.value
    if clamp.mode == "add":
        return mul, shift + clamp.value
    return mul * clamp.value, shift * clamp.value
