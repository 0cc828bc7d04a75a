"""Reading features for a serving engine: each request's ``Features``, planned token by token
each step, kept per request across steps until taken.

An engine's forward is token-major (``[num_tokens, hidden]``, ragged by request), and the op
records it as a batch of one-token rows, so a step's ``RecordPlan`` names tokens: each
recording request's tokens, with its own width and kind (``row_features``: requests record
independently). After the forward, ``collect`` copies the recorded tokens out of each site's
buffers once, and each request keeps its part (a view) with the position of its first token,
so a chunked prefill lands where it belongs and a preempted request that is computed again
overwrites its earlier record. ``take`` joins a
request's chunks into one ``FeatureRecord`` per site, ``[1, length, width]``, with padding
(value 0, index -1) at positions nothing recorded. A request may also name a key of the
client's (a server's clients know no engine request ids), by which ``take_keyed`` finds it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from ..features import PAD_INDEX, FeatureRecord, Features
from .recording import RecordPlan, SiteRecorder

logger = logging.getLogger(__name__)

#: Requests whose records are kept after they leave the batch, until taken: the oldest go first.
RETAINED_REQUESTS = 1024


@dataclass
class _Chunk:
    """What one forward recorded of one request at one site, from position ``start`` on."""

    start: int
    values: torch.Tensor  # [n, width], a view of the forward's copy of the site's record
    indices: torch.Tensor | None  # [n, width]; None for a dense request


@dataclass
class _RequestRecord:
    requests: dict[str, Features]  # by site
    key: str | None
    chunks: dict[str, list[_Chunk]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Span:
    """A recording request's tokens in one forward: ``count`` tokens from ``offset`` in the
    flattened batch, the first at position ``position`` of its sequence."""

    request_id: Hashable
    offset: int
    count: int
    position: int


class EngineRecording:
    """The record requests of one engine worker's requests, and what they recorded."""

    def __init__(self, recorders: dict[str, SiteRecorder], retain: int = RETAINED_REQUESTS) -> None:
        self._recorders = recorders
        self._retain = retain
        self._records: OrderedDict[Hashable, _RequestRecord] = OrderedDict()
        self._keys: dict[str, Hashable] = {}  # the request id of each client key
        self._spans: tuple[_Span, ...] = ()  # the tokens the planned forward records
        self._planned: tuple[str, ...] = ()  # the sites it records at

    @property
    def held(self) -> int:
        """Requests whose records are kept here: running, or finished and not yet taken."""
        return len(self._records)

    def admit(self, request_id: Hashable, requests: Sequence[Features], key: str | None = None) -> None:
        """Record ``requests`` (validated against the sites already) for ``request_id`` from its
        next forward on, also known by ``key`` if given (a later request with the same key takes
        it over). A request admitted again (preempted, then resumed) keeps its record."""
        if requests and request_id not in self._records:
            self._records[request_id] = _RequestRecord({request.site: request for request in requests}, key)
            if key is not None:
                self._keys[key] = request_id

    def plan(self, batch: Sequence[Hashable], counts: torch.Tensor, positions: torch.Tensor) -> None:
        """Plan the next forward: ``batch[i]`` owns its next ``counts[i]`` tokens (a host tensor),
        whose positions in their sequences ``positions [num_tokens]`` hold (read back only for
        recording requests)."""
        if not (self._records or self._planned):
            return  # nothing records, nothing did: an unrecorded step costs this
        self._spans = self._recording_spans(batch, counts.tolist(), positions)
        plans = self._site_plans()
        for name, recorder in self._recorders.items():
            if recorder.plan is not None or name in plans:
                recorder.set_plan(plans.get(name))
        self._planned = tuple(plans)
        self._evict(set(batch))

    def _recording_spans(self, batch: Sequence[Hashable], counts: Sequence[int], positions: torch.Tensor) -> tuple[_Span, ...]:
        """The tokens of the recording requests of ``batch``, with their first positions."""
        spans, offset = [], 0
        for request_id, count in zip(batch, counts, strict=True):
            if count and request_id in self._records:
                spans.append((request_id, offset, count))
            offset += count
        if not spans:
            return ()
        firsts = positions[[offset for _, offset, _ in spans]].tolist()
        return tuple(_Span(*span, first) for span, first in zip(spans, firsts, strict=True))

    def _site_plans(self) -> dict[str, RecordPlan]:
        rows: dict[str, tuple[list[int], list[int], list[tuple[int, ...] | None]]] = {}
        for span in self._spans:
            for name, request in self._records[span.request_id].requests.items():
                site_rows, widths, kinds = rows.setdefault(name, ([], [], []))
                site_rows.extend(range(span.offset, span.offset + span.count))
                widths.extend([request.width] * span.count)
                kinds.extend([request.features] * span.count)
        return {name: _token_plan(*columns) for name, columns in rows.items()}

    def collect(self) -> None:
        """After the planned forward: copy the recorded tokens out of the buffers, once per site,
        and hand each recording request its part (a view of that copy)."""
        for name in self._planned:
            recorder = self._recorders[name]
            if recorder.written_width is None:
                # A captured graph without the record path replayed (the front end refuses
                # recording requests to engines that capture): the requests go unrecorded here.
                logger.error("sae_compile: the forward recorded nothing at %s; its requests' records miss these tokens.", name)
                continue
            tokens = self._spans[-1].offset + self._spans[-1].count
            values, indices = (out[:, 0].clone() for out in recorder.output(tokens, 1, recorder.written_width))  # [N, width]
            for span in self._spans:
                self._keep(span, name, values, indices)
            recorder.written_width = None

    def _keep(self, span: _Span, name: str, values: torch.Tensor, indices: torch.Tensor) -> None:
        record = self._records[span.request_id]
        request = record.requests.get(name)
        if request is None:
            return
        tokens = slice(span.offset, span.offset + span.count)
        kept_indices = None if request.features is not None else indices[tokens, : request.width]
        record.chunks.setdefault(name, []).append(_Chunk(span.position, values[tokens, : request.width], kept_indices))

    def take(self, request_ids: Sequence[Hashable]) -> dict[Hashable, dict[str, FeatureRecord]]:
        """The records of ``request_ids`` (on the CPU), which are forgotten here; ids that recorded
        nothing, or whose records were dropped, are left out."""
        taken = {}
        for request_id in request_ids:
            record = self._forget(request_id)
            if record is not None:
                taken[request_id] = {name: _joined(record.requests[name], chunks) for name, chunks in record.chunks.items()}
        return taken

    def take_keyed(self, keys: Sequence[str]) -> dict[str, dict[str, FeatureRecord]]:
        """``take`` of the requests that named ``keys``, by key; a key not held is left out."""
        known = {key: self._keys[key] for key in keys if key in self._keys}
        taken = self.take(list(known.values()))
        return {key: taken[request_id] for key, request_id in known.items() if request_id in taken}

    def _forget(self, request_id: Hashable) -> _RequestRecord | None:
        record = self._records.pop(request_id, None)
        if record is not None and record.key is not None and self._keys.get(record.key) == request_id:
            del self._keys[record.key]
        return record

    def _evict(self, running: set[Hashable]) -> None:
        """Drop the oldest records of requests not running past ``retain`` (never taken)."""
        for request_id in list(self._records):
            if len(self._records) <= self._retain:
                return
            if request_id not in running:
                self._forget(request_id)


def _token_plan(rows: list[int], widths: list[int], kinds: list[tuple[int, ...] | None]) -> RecordPlan:
    """A plan whose rows are tokens; every row of one kind and list takes the shared form."""
    shared = set(kinds)
    if len(shared) == 1:
        return RecordPlan(tuple(rows), tuple(widths), next(iter(shared)))
    return RecordPlan(tuple(rows), tuple(widths), None, tuple(kinds))


def _joined(request: Features, chunks: list[_Chunk]) -> FeatureRecord:
    """The chunks of one request at one site as ``[1, length, width]``; later chunks win."""
    if _in_sequence(chunks):
        values = torch.cat([chunk.values for chunk in chunks]).cpu()
        indices = None if request.features is not None else torch.cat([chunk.indices for chunk in chunks]).cpu()
        return FeatureRecord(values[None], None if indices is None else indices[None], request.features)
    length = max(chunk.start + chunk.values.shape[0] for chunk in chunks)
    values = torch.zeros(length, request.width, dtype=chunks[0].values.dtype)
    indices = None if request.features is not None else torch.full((length, request.width), PAD_INDEX, dtype=torch.long)
    for chunk in chunks:
        positions = slice(chunk.start, chunk.start + chunk.values.shape[0])
        values[positions] = chunk.values.cpu()
        if indices is not None:
            indices[positions] = chunk.indices.cpu()
    return FeatureRecord(values[None], None if indices is None else indices[None], request.features)


def _in_sequence(chunks: list[_Chunk]) -> bool:
    """Whether the chunks cover positions 0.. one after the other (no gap, nothing computed twice)."""
    end = 0
    for chunk in chunks:
        if chunk.start != end:
            return False
        end += chunk.values.shape[0]
    return True
