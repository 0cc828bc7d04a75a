"""Steering state for a serving engine: requests come and go between steps, tokens are flattened.

``EngineState`` is what one engine worker holds: a site state per attached site, the routing,
and a row per distinct steering of the requests in flight (``SlotManager``: identical steerings
share a row). Each step the engine hands over its batch: which requests, in token order, own
how many tokens. ``sync`` admits requests it has not seen and releases those that left (finished,
aborted or preempted: a preempted request is admitted again when it returns), then ``route``
writes the token-major routing the op reads.

Requests may also read features (``Features``): ``recording`` plans each step's record and
keeps what each request recorded until it is taken (``runtime.engine_recording``).

``validate_steering`` and ``validate_record`` run the same checks where requests arrive (a
server's front end), against the sites' shapes alone, so a bad request fails there and never
reaches a worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..edits import Steering
from ..features import Features
from ..sae import SAE
from .engine_recording import EngineRecording
from .recording import check_request
from .slots import SlotManager
from .staging import stage_row
from .state import Capacity, RoutingState, SiteState, allocate_sites


class RequestSpec(NamedTuple):
    """What an engine request asks of the state: its steering, prompt length, record requests
    and the client's key for its records (``EngineRecording.take_keyed``)."""

    steering: Steering | None
    prompt_len: int
    record: tuple[Features, ...] = ()
    record_key: str | None = None


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


def validate_record(requests: Sequence[Features], shapes: dict[str, SiteShape]) -> None:
    """Raise ValueError, naming the problem, unless each of ``requests`` can be recorded at
    ``shapes``: an attached SAE site, recorded once, within the record buffers' width."""
    resolve = attached_resolver(list(shapes))
    seen = set()
    for request in requests:
        shape = shapes[resolve(request.site)]
        if shape.d_sae == 0:
            raise ValueError(f"record: {request.site} has no SAE attached (it is steered additively), so there are no features to read there.")
        if request.site in seen:
            raise ValueError(f"record: {request.site} is recorded twice; give one sc.Features per site.")
        seen.add(request.site)
        check_request(request.site, request, shape.d_sae, shape.capacity.max_top_k)


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
        if capacity.max_top_k and capacity.max_batch < capacity.max_tokens:
            raise ValueError(
                f"EngineState: a record plan names each token of a step as a row, so max_batch "
                f"({capacity.max_batch}) must be at least max_tokens ({capacity.max_tokens}) when max_top_k > 0."
            )
        self.routing: RoutingState
        self.sites: dict[str, SiteState]
        self.routing, self.sites, _ = allocate_sites(saes, dict.fromkeys(saes, hidden_size), capacity, dtype, device, digest)
        self.requests = SlotManager(self.sites, self.routing, attached_resolver(list(saes)), capacity.slot_rows)
        self.recording = EngineRecording({name: site.recorder for name, site in self.sites.items() if site.recorder is not None})
        self._batch: tuple[str, ...] = ()

    def checked_record(self, requests: Sequence[Features]) -> tuple[Features, ...]:
        """``requests``, once each is found to fit the attached sites (``validate_record``)."""
        validate_record(requests, {name: SiteShape(site.width, site.d_sae, site.capacity) for name, site in self.sites.items()})
        return tuple(requests)

    @property
    def handles(self) -> dict[str, str]:
        """The op handle of each attached site."""
        return {name: state.handle for name, state in self.sites.items()}

    def sync(self, batch: Sequence[str], describe: Callable[[str], tuple]) -> None:
        """Make the admitted requests exactly ``batch``: admit each new one with ``describe(id)``
        (a ``RequestSpec``, or the tuple of its fields), release the ones that left."""
        batch = tuple(batch)
        if batch == self._batch:
            return
        current = set(batch)
        admitted = self.requests.requests
        released = [request_id for request_id in admitted if request_id not in current]
        fresh = {request_id: RequestSpec(*describe(request_id)) for request_id in batch if request_id not in admitted}
        self.requests.replace(released, {request_id: (spec.steering, spec.prompt_len) for request_id, spec in fresh.items()})
        for request_id, spec in fresh.items():
            self.recording.admit(request_id, spec.record, spec.record_key)
        self._batch = batch

    def route(self, batch: Sequence[str], counts: torch.Tensor, positions: torch.Tensor) -> None:
        """Route the next forward: ``batch[i]`` owns the next ``counts[i]`` of its tokens, at
        ``positions`` (``[num_tokens]``) of their sequences."""
        self.requests.assign_tokens(batch, counts, positions)
        self.recording.plan(batch, counts, positions)
