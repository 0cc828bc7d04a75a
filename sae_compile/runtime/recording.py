"""Static state for reading features: what each site records in the next forward, and where.

A ``SiteRecorder`` belongs to one attached SAE site. Its output buffers are allocated once
at capacity (``max_tokens x max_top_k`` values and indices), like every other tensor the op
reads, so their addresses never change. The host writes a ``RecordPlan`` between forwards;
the op (``kernels.record``) encodes the planned rows' tokens and writes the buffers; the
host then copies the result out (``SiteRecorder.collect``), so a record never aliases
state that the next forward overwrites.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..features import PAD_INDEX, FeatureRecord, Features


@dataclass(frozen=True)
class RecordPlan:
    """What one site records in the next forward: batch rows ``rows`` (ascending), each with
    its own number of entries ``widths`` (its top_k, or the dense list's length), and for a
    dense request the ``features`` every one of those rows reads (None: top-k).

    ``row_features`` (an engine's batch, whose requests record independently) gives each row
    its own kind instead: its dense list, or None for top-k; ``features`` is then None."""

    rows: tuple[int, ...]
    widths: tuple[int, ...]
    features: tuple[int, ...] | None
    row_features: tuple[tuple[int, ...] | None, ...] | None = None

    @property
    def width(self) -> int:
        """Entries per token in the record: the largest row's."""
        return max(self.widths)


class SiteRecorder:
    """The record buffers of one site and the plan for its next forward.

    Device buffers: ``values [max_tokens * K]`` (model dtype) and ``indices [max_tokens * K]``
    (int64), viewed as ``[B, S, width]`` for a forward, where ``K = max_top_k``. The plan's
    device tables: ``batch_index [max_batch]`` (the recording rows, ascending),
    ``row_width [max_batch]`` (each batch row's k, 0 for a row that records nothing),
    ``dense_features [K]`` (the dense request's features) and ``dense []`` (whether the
    request is dense). A forward on the host's plan reads the first two and writes ``[B, S,
    plan.width]``; a captured graph reads the last three and writes ``[B, S, static_width]``.
    A plan with ``row_features`` also reads ``row_features [max_batch, K]`` and ``row_dense
    [max_batch]``: each recording row's dense list and kind, in the order of ``plan.rows``.
    """

    def __init__(
        self, name: str, max_tokens: int, max_batch: int, max_top_k: int, features: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.name = name
        self.max_top_k = max_top_k
        self.static_width = min(max_top_k, features)  # what a captured graph records per token
        self.values = torch.zeros(max_tokens * max_top_k, dtype=dtype, device=device)
        self.indices = torch.full((max_tokens * max_top_k,), PAD_INDEX, dtype=torch.long, device=device)
        self.batch_index = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.row_width = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.dense_features = torch.zeros(max_top_k, dtype=torch.long, device=device)
        self.dense = torch.zeros((), dtype=torch.bool, device=device)
        self.row_features = torch.zeros(max_batch, max_top_k, dtype=torch.long, device=device)
        self.row_dense = torch.zeros(max_batch, dtype=torch.bool, device=device)
        self.plan: RecordPlan | None = None
        self._written: RecordPlan | None = None  # what the device tables hold
        # Set when a forward writes the buffers: the width per token it wrote. A replayed CUDA
        # graph runs no Python, so whoever replays one that records says so (``replayed``); a
        # forward that should have recorded and left this unset replayed a graph that does not.
        self.written_width: int | None = None

    def check(self, request: Features, d_sae: int) -> None:
        """ValueError unless ``request`` fits this site's SAE (``d_sae`` features) and buffers."""
        check_request(self.name, request, d_sae, self.max_top_k)

    def set_plan(self, plan: RecordPlan | None) -> None:
        """Host write: the next forwards record ``plan`` (``None``: nothing, at no cost). The
        device tables keep the last plan written, so a loop that records alike copies nothing."""
        if plan is not None and plan != self._written:
            rows = torch.tensor(plan.rows, dtype=torch.long)
            self.row_width.zero_()
            self.row_width.index_copy_(0, rows.to(self.row_width.device), torch.tensor(plan.widths, device=self.row_width.device))
            self.batch_index[: len(plan.rows)].copy_(rows, non_blocking=True)
            self.dense.fill_(plan.features is not None)
            if plan.features is not None:
                self.dense_features[: len(plan.features)].copy_(torch.tensor(plan.features, dtype=torch.long))
            if plan.row_features is not None:
                self._write_row_features(plan.row_features)
            self._written = plan
        self.plan = plan
        self.written_width = None  # what an earlier forward wrote is not this plan's record

    def _write_row_features(self, row_features: Sequence[tuple[int, ...] | None]) -> None:
        """Each recording row's dense list (zero-padded) and kind, in plan order."""
        count = len(row_features)
        lists = [list(features or ()) + [0] * (self.max_top_k - len(features or ())) for features in row_features]
        self.row_features[:count].copy_(torch.tensor(lists, dtype=torch.long), non_blocking=True)
        kinds = torch.tensor([features is not None for features in row_features])
        self.row_dense[:count].copy_(kinds, non_blocking=True)

    def output(self, batch: int, seq: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``[B, S, width]`` values and indices views a forward writes."""
        n = batch * seq * width
        shape = (batch, seq, width)
        return self.values[:n].view(shape), self.indices[:n].view(shape)

    def replayed(self) -> None:
        """Note that a captured graph holding the record path replayed: it wrote the buffers."""
        if self.plan is not None:
            self.written_width = self.static_width

    def collect(self, batch: int, seq: int) -> FeatureRecord:
        """A copy of what the last forward (``[batch, seq]`` tokens) recorded here."""
        if self.written_width is None:
            raise RuntimeError(
                f"record: nothing recorded {self.name} since its plan was set or its record last collected: "
                "no forward ran, or it ran as a captured CUDA graph (or the warmup before one) that does not "
                "hold the record path. Run a forward first; record outside captured graphs, or capture with "
                "the record path (SteeredModel.capture_steps with sc.Paths(record=True))."
            )
        plan = self.plan
        assert plan is not None
        # A captured graph writes every row to static_width: the plan's entries are the first plan.width.
        written = self.output(batch, seq, self.written_width)
        values, indices = (out[..., : plan.width].clone(memory_format=torch.contiguous_format) for out in written)
        self.written_width = None
        return FeatureRecord(values, None if plan.features is not None else indices, plan.features)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("values", "indices", "batch_index", "row_width", "dense_features", "dense", "row_features", "row_dense")
        return {f"{self.name}.record_{name}": getattr(self, name) for name in names}


def check_request(name: str, request: Features, d_sae: int, max_top_k: int) -> None:
    """ValueError unless ``request`` fits site ``name``: an SAE of ``d_sae`` features and record
    buffers ``max_top_k`` wide (0: the site records nothing)."""
    if max_top_k == 0:
        raise ValueError(f"Features at {name}: no record buffers were sized (max_top_k=0), so nothing can be recorded there.")
    limit = min(d_sae, max_top_k)
    if request.top_k is not None and request.top_k > limit:
        raise ValueError(
            f"Features at {name}: top_k={request.top_k} is outside [1, {limit}] (the SAE has {d_sae} "
            f"features and max_top_k={max_top_k} sized the buffers)."
        )
    if request.features is not None:
        if len(request.features) > max_top_k:
            raise ValueError(
                f"Features at {name}: {len(request.features)} features exceed max_top_k={max_top_k}, "
                "which also bounds a dense list; size the buffers with a larger max_top_k."
            )
        if max(request.features) >= d_sae:
            raise ValueError(f"Features at {name}: feature {max(request.features)} is out of range for an SAE with {d_sae} features.")


def plan_site(name: str, requests: Sequence[Features | None]) -> RecordPlan | None:
    """The plan for site ``name`` from each batch row's request there (``None``: none).

    Rows may ask for different ``top_k``; dense rows must all name the same features, and one
    site cannot mix the two (one record holds the whole batch). ValueError otherwise.
    """
    rows = tuple(b for b, request in enumerate(requests) if request is not None)
    if not rows:
        return None
    chosen = [requests[b] for b in rows]
    dense = {request.features for request in chosen if request.features is not None}
    if dense and any(request.features is None for request in chosen):
        raise ValueError(f"record: rows at {name} mix top_k= and features= requests; one site records one kind per call.")
    if len(dense) > 1:
        raise ValueError(f"record: rows at {name} record different feature lists densely; use one list, or top_k=.")
    features = next(iter(dense)) if dense else None
    return RecordPlan(rows, tuple(request.width for request in chosen), features)


RecordArg = Sequence[Features] | Sequence[Sequence[Features] | None] | None


def per_row_requests(record: RecordArg, batch: int) -> list[tuple[Features, ...]]:
    """Each batch row's requests from ``record=``: None, a list of ``Features`` for every row,
    or one list-of-``Features``-or-None per row. TypeError/ValueError for anything else."""
    if record is None:
        return [()] * batch
    if isinstance(record, Features) or not isinstance(record, Sequence):
        raise TypeError("record= takes a list of sc.Features (for every row) or one such list (or None) per batch row.")
    items = list(record)
    if all(isinstance(item, Features) for item in items):
        return [tuple(items)] * batch
    if len(items) != batch:
        raise ValueError(f"record=: a per-row list needs one entry per batch row; got {len(items)} for a batch of {batch}.")
    rows = []
    for item in items:
        if item is not None and (isinstance(item, Features) or not all(isinstance(r, Features) for r in item)):
            raise TypeError("record=: each per-row entry must be a list of sc.Features, or None.")
        rows.append(() if item is None else tuple(item))
    return rows


class Recording:
    """The record plans of one model's sites, set per call: validates ``record=`` against the
    attached sites, plans each site, and collects what a forward recorded."""

    def __init__(self, recorders: dict[str, SiteRecorder], d_sae: Callable[[str], int], resolve: Callable[[str], str]) -> None:
        self._recorders = recorders
        self._d_sae = d_sae
        self._resolve = resolve
        self._active: tuple[str, ...] = ()
        self.current: dict[str, RecordPlan] = {}  # the plans last applied

    @property
    def active(self) -> bool:
        """Whether the next forward records anything."""
        return bool(self._active)

    def plans(self, per_row: list[tuple[Features, ...]]) -> dict[str, RecordPlan]:
        """Each recorded site's plan for rows ``per_row``; raises before anything is written."""
        by_site: dict[str, list[Features | None]] = {}
        for row, requests in enumerate(per_row):
            for request in requests:
                name = self._site(request)
                column = by_site.setdefault(name, [None] * len(per_row))
                if column[row] is not None:
                    raise ValueError(f"record: row {row} records {name} twice; give one sc.Features per site and row.")
                column[row] = request
        plans = {name: plan_site(name, column) for name, column in by_site.items()}
        return {name: plan for name, plan in plans.items() if plan is not None}

    def _site(self, request: Features) -> str:
        name = self._resolve(request.site)
        recorder = self._recorders.get(name)
        if recorder is None:
            raise ValueError(
                f"record: {name} has no SAE attached (or sc.steer(max_top_k=0) sized no record buffers), "
                "so there are no features to read there."
            )
        recorder.check(request, self._d_sae(name))
        return name

    def apply(self, plans: dict[str, RecordPlan]) -> None:
        """Host write: the next forwards record ``plans`` (every other site records nothing)."""
        for name, recorder in self._recorders.items():
            recorder.set_plan(plans.get(name))
        self._active = tuple(sorted(plans))
        self.current = plans

    def collect(self, batch: int, seq: int) -> dict[str, FeatureRecord]:
        """Copies of what the last ``[batch, seq]`` forward recorded, by site."""
        return {name: self._recorders[name].collect(batch, seq) for name in self._active}

    def replayed(self) -> None:
        """A captured graph holding the record path replayed: every active site recorded."""
        for name in self._active:
            self._recorders[name].replayed()

    def clear(self) -> None:
        """Record nothing from now on."""
        if self._active:
            self.apply({})
