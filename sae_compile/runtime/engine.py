"""Steering state for a serving engine: requests come and go between steps, tokens are flattened.

``EngineState`` is what one engine worker holds: a site state per attached site, the routing,
and a row per distinct steering of the requests in flight (``SlotManager``: identical steerings
share a row). Each step the engine hands over its batch: which requests, in token order, own
how many tokens. ``sync`` admits requests it has not seen and releases those that left (finished,
aborted or preempted: a preempted request is admitted again when it returns), then ``route``
writes the token-major routing the op reads.

``validate_steering`` runs the same checks where requests arrive (a server's front end), against
the sites' shapes alone, so a bad request fails there and never reaches a worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..edits import Steering
from ..sae import SAE
from .slots import SlotManager
from .staging import stage_row
from .state import Capacity, RoutingState, SiteState, allocate_sites


@dataclass(frozen=True)
class SiteShape:
    """What validating a steering needs to know of an attached site (see ``staging.stage_row``)."""

    width: int
    d_sae: int  # 0: attached for additive steering only
    capacity: Capacity


def attached_resolver(names: Sequence[str]) -> Callable[[str], str]:
    """Site-name resolution for an engine: attached sites are named by their hook names."""
    attached = frozenset(names)

    def resolve(name: str) -> str:
        if name not in attached:
            listed = ", ".join(sorted(attached)) or "none"
            raise ValueError(f"Site {name!r} is not attached, so it cannot be steered. Attached sites: {listed}.")
        return name

    return resolve


def validate_steering(steering: Steering, shapes: dict[str, SiteShape]) -> None:
    """Raise ValueError or TypeError, naming the problem, if ``steering`` cannot run on ``shapes``."""
    stage_row(steering, shapes, attached_resolver(list(shapes)))


class EngineState:
    """The steering state of one engine worker (see the module docstring)."""

    def __init__(
        self,
        saes: dict[str, SAE | None],
        hidden_size: int,
        capacity: Capacity,
        dtype: torch.dtype,
        device: torch.device,
        digest: str,
    ) -> None:
        self.routing: RoutingState
        self.sites: dict[str, SiteState]
        self.routing, self.sites, _ = allocate_sites(saes, dict.fromkeys(saes, hidden_size), capacity, dtype, device, digest)
        self.requests = SlotManager(self.sites, self.routing, attached_resolver(list(saes)), capacity.slot_rows)
        self._batch: tuple[str, ...] = ()

    @property
    def handles(self) -> dict[str, str]:
        """The op handle of each attached site."""
        return {name: state.handle for name, state in self.sites.items()}

    def sync(self, batch: Sequence[str], describe: Callable[[str], tuple[Steering | None, int]]) -> None:
        """Make the admitted requests exactly ``batch``: admit each new one with ``describe(id)``
        (its steering and prompt length), release the ones that left."""
        batch = tuple(batch)
        if batch == self._batch:
            return
        current = set(batch)
        admitted = self.requests.requests
        released = [request_id for request_id in admitted if request_id not in current]
        fresh = {request_id: describe(request_id) for request_id in batch if request_id not in admitted}
        self.requests.replace(released, fresh)
        self._batch = batch

    def route(self, batch: Sequence[str], counts: torch.Tensor, positions: torch.Tensor) -> None:
        """Route the next forward: ``batch[i]`` owns the next ``counts[i]`` of its tokens."""
        self.requests.assign_tokens(batch, counts, positions)
