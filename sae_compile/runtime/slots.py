"""Request slots for production loops: admission, update, release and batch assignment.

Each admitted request holds a steering row. Requests whose steerings have the same content
key (``runtime.hashing``) share one row, refcounted. Every operation validates and checks
capacity before it writes anything, so a rejected call leaves every table and every piece
of manager state exactly as it was. Keys are computed at admission; the per-step work
(``assign``) is a list lookup and two small host-to-device copies.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..edits import Steering
from .hashing import steering_key
from .staging import stage_row
from .state import NO_STEERING_ROW, SCOPE_CODES, RoutingState, RowEdits, SiteState


@dataclass(frozen=True)
class Request:
    """An admitted request: its steering row (0: unsteered), content key and prompt length."""

    row: int
    key: str | None
    prompt_len: int


@dataclass(frozen=True)
class _Staged:
    key: str
    edits: dict[str, RowEdits]
    scope: int


Method = TypeVar("Method", bound=Callable[..., Any])


def _locked(method: Method) -> Method:
    """Run ``method`` holding the manager's lock: a forward on another thread never sees a
    half-written table."""

    @functools.wraps(method)
    def locked(self: SlotManager, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class SlotManager:
    """Owns a pool of steering rows of one steered model.

    ``admit(request_id, steering, prompt_len)`` gives a request a row; ``update`` changes
    its steering; ``release`` frees it (idempotent); ``assign(batch)`` routes the next
    forwards: batch row ``b`` serves request ``batch[b]`` (``None``: an unsteered row).
    ``rows`` are the table rows this manager owns; managers with disjoint rows share the
    tables and the routing without touching each other's requests. Every public method
    holds ``lock``, which the model's forwards hold too.
    """

    def __init__(
        self,
        sites: dict[str, SiteState],
        routing: RoutingState,
        resolve: Callable[[str], str],
        rows: range | None = None,
        lock: threading.RLock | None = None,
    ) -> None:
        rows = routing.capacity.slot_rows if rows is None else rows
        self._sites = sites
        self._routing = routing
        self._resolve = resolve
        self._lock = threading.RLock() if lock is None else lock
        self._requests: dict[Hashable, Request] = {}
        self._row_of_key: dict[str, int] = {}
        self._refs: dict[int, int] = {}
        self._free = list(reversed(rows))
        self._capacity = len(rows)
        self._batch: tuple[list[Hashable | None], Sequence[int] | torch.Tensor] = ([], [])

    @property
    def requests(self) -> dict[Hashable, Request]:
        """Admitted requests by id (a copy)."""
        return dict(self._requests)

    def rows_in_use(self) -> dict[int, int]:
        """Steering rows in use, with how many requests share each."""
        return dict(self._refs)

    @_locked
    def admit(self, request_id: Hashable, steering: Steering | None, prompt_len: int) -> int:
        """Admit a request; returns its steering row (0 if ``steering`` is None)."""
        if request_id in self._requests:
            raise ValueError(f"admit: request {request_id!r} is already admitted; use update() or release() first.")
        _check_prompt_len(prompt_len)
        staged = self._stage(steering)
        self._check_capacity([staged], released=())
        return self._take(request_id, staged, prompt_len)

    @_locked
    def update(self, request_id: Hashable, steering: Steering | None, prompt_len: int | None = None) -> int:
        """Change an admitted request's steering (and optionally prompt length); returns its row."""
        if request_id not in self._requests:
            raise ValueError(f"update: request {request_id!r} is not admitted; admit() it first.")
        old = self._requests[request_id]
        prompt_len = old.prompt_len if prompt_len is None else prompt_len
        _check_prompt_len(prompt_len)
        staged = self._stage(steering)
        self._check_capacity([staged], released=(request_id,))
        self._drop(request_id)
        row = self._take(request_id, staged, prompt_len)
        self._reroute(request_id)
        return row

    @_locked
    def release(self, request_id: Hashable) -> None:
        """Free a request's row (when no other request shares it). Releasing twice is a no-op.

        Batch rows still assigned to the request run unsteered from the next forward on.
        """
        if request_id in self._requests:
            self._drop(request_id)
            self._reroute(request_id)

    @_locked
    def replace(self, released: Sequence[Hashable], admitted: dict[Hashable, tuple[Steering | None, int]]) -> None:
        """Release ``released`` and admit ``admitted`` as one atomic step."""
        for request_id in admitted:
            if request_id in self._requests and request_id not in released:
                raise ValueError(f"admit: request {request_id!r} is already admitted; use update() or release() first.")
        for _, prompt_len in admitted.values():
            _check_prompt_len(prompt_len)
        staged = {request_id: self._stage(steering) for request_id, (steering, _) in admitted.items()}
        self._check_capacity(list(staged.values()), released=released)
        for request_id in released:
            self.release(request_id)
        for request_id, item in staged.items():
            self._take(request_id, item, admitted[request_id][1])

    @_locked
    def assign(self, batch: Sequence[Hashable | None], prompt_lens: Sequence[int] | torch.Tensor | None = None) -> None:
        """Route the next forwards: batch row ``b`` serves request ``batch[b]``.

        ``prompt_lens`` overrides the requests' prompt lengths per batch row (or, as a 0-d
        device tensor, for every row, read on the device).
        """
        requests = self._batch_requests("assign", batch)
        if prompt_lens is None:
            prompt_lens = [0 if r is None else r.prompt_len for r in requests]
        elif not isinstance(prompt_lens, torch.Tensor) and len(prompt_lens) != len(batch):
            raise ValueError(f"assign: {len(prompt_lens)} prompt lengths for a batch of {len(batch)}.")
        lengths = prompt_lens if isinstance(prompt_lens, torch.Tensor) else list(prompt_lens)
        self._routing.assign([NO_STEERING_ROW if r is None else r.row for r in requests], lengths)
        self._batch = (list(batch), lengths)

    @_locked
    def assign_tokens(self, batch: Sequence[Hashable | None], counts: torch.Tensor, positions: torch.Tensor) -> None:
        """Route the next token-major forward: request ``batch[i]`` owns the next ``counts[i]``
        tokens (``counts``: a host tensor), in order; ``positions [num_tokens]`` are the tokens'
        positions in their sequences, on the device. See ``RoutingState.route_tokens``."""
        requests = self._batch_requests("assign_tokens", batch)
        rows = [NO_STEERING_ROW if r is None else r.row for r in requests]
        prompt_lens = [0 if r is None else r.prompt_len for r in requests]
        self._routing.route_tokens(rows, prompt_lens, counts, positions)

    def _batch_requests(self, method: str, batch: Sequence[Hashable | None]) -> list[Request | None]:
        capacity = self._routing.capacity.max_batch
        if len(batch) > capacity:
            raise ValueError(f"{method}: batch of {len(batch)} rows exceeds max_batch={capacity}; pass a larger max_batch to sc.steer().")
        unknown = [r for r in batch if r is not None and r not in self._requests]
        if unknown:
            raise ValueError(f"{method}: requests {unknown!r} are not admitted; admit() them first.")
        return [self._requests[r] if r is not None else None for r in batch]

    @_locked
    def reapply(self) -> None:
        """Write this manager's last assignment back into the routing (after another manager's)."""
        batch, prompt_lens = self._batch
        self._routing.assign([NO_STEERING_ROW if r is None else self._requests[r].row for r in batch], prompt_lens)

    def _reroute(self, request_id: Hashable) -> None:
        """Rewrite the batch routing if ``request_id`` is assigned: an update may have moved it
        to another row, and a released request must stop reading a row that is reused."""
        batch, prompt_lens = self._batch
        if request_id not in batch:
            return
        batch = [r if r in self._requests else None for r in batch]
        self._routing.assign([NO_STEERING_ROW if r is None else self._requests[r].row for r in batch], prompt_lens)
        self._batch = (batch, prompt_lens)

    def _stage(self, steering: Steering | None) -> _Staged | None:
        if steering is None:
            return None
        if not isinstance(steering, Steering):
            raise TypeError(f"steering must be a Steering or None, got {type(steering).__name__}.")
        edits = stage_row(steering, self._sites, self._resolve)
        return _Staged(steering_key(steering, self._resolve), edits, SCOPE_CODES[steering.tokens])

    def _check_capacity(self, staged: list[_Staged | None], released: Sequence[Hashable]) -> None:
        freed_refs: dict[int, int] = {}
        for request_id in released:
            request = self._requests.get(request_id)
            if request is not None and request.row != NO_STEERING_ROW:
                freed_refs[request.row] = freed_refs.get(request.row, 0) + 1
        live_keys = {key for key, row in self._row_of_key.items() if self._refs[row] > freed_refs.get(row, 0)}
        new_keys = {s.key for s in staged if s is not None} - live_keys
        available = len(self._free) + sum(1 for row, n in freed_refs.items() if self._refs[row] == n)
        if len(new_keys) > available:
            raise ValueError(
                f"steering needs {len(new_keys)} new rows but only {available} are free (max_rows="
                f"{self._capacity}). Release finished requests, or pass a larger max_rows to sc.steer()."
            )

    def _take(self, request_id: Hashable, staged: _Staged | None, prompt_len: int) -> int:
        if staged is None:
            self._requests[request_id] = Request(NO_STEERING_ROW, None, prompt_len)
            return NO_STEERING_ROW
        row = self._row_of_key.get(staged.key)
        if row is None:
            row = self._free.pop()
            for name, site in self._sites.items():
                site.write_row(row, staged.edits.get(name))
            self._routing.set_scope(row, staged.scope)
            self._row_of_key[staged.key] = row
        self._refs[row] = self._refs.get(row, 0) + 1
        self._requests[request_id] = Request(row, staged.key, prompt_len)
        return row

    def _drop(self, request_id: Hashable) -> None:
        request = self._requests.pop(request_id)
        if request.row == NO_STEERING_ROW:
            return
        self._refs[request.row] -= 1
        if self._refs[request.row] == 0:
            del self._refs[request.row]
            del self._row_of_key[request.key]
            for site in self._sites.values():
                site.write_row(request.row, None)
            self._routing.set_scope(request.row, 0)
            self._free.append(request.row)


def _check_prompt_len(prompt_len: object) -> None:
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int):
        raise TypeError(f"prompt_len must be an int, got {type(prompt_len).__name__}.")
    if prompt_len < 0:
        raise ValueError(f"prompt_len must be non-negative, got {prompt_len}.")
