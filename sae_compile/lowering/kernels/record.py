"""Recording a site's SAE features inside the steering op, before the site's own edits.

On the host's plan (a forward outside a captured graph), the op encodes only the batch rows
a site's ``RecordPlan`` names: the full encode ``f = act(x @ W_enc + b_enc)`` (``b_dec``
folded into ``b_enc`` as for steering; ``x`` layer-normalised first for an SAE with
``layer_norm_input``), a chunk of tokens at a time, then keeps each token's ``width``
largest (top-k) or the dense request's columns, and writes them into the site's static
record buffers. Every other entry of the ``[B, S, width]`` record is padding: value 0 and,
for top-k, index -1. Under declared paths with ``record`` (a captured graph, or its warmup)
it encodes every row to the buffers' static width instead and pads from device tables, so
that a replay follows whatever plan the host wrote before it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from ...activations import activate_, top_k_indices
from ...features import PAD_INDEX
from ...runtime.recording import RecordPlan, SiteRecorder
from ...runtime.state import SiteState
from . import torch_path, triton_sae

# Tokens per encode step: bounds the [tokens, F] scratch as the full steering path does.
RECORD_CHUNK = 256


def record_site(x: torch.Tensor, site: SiteState, valid: torch.Tensor, static: bool) -> None:
    """Write the record of ``x [B, S, D]`` (the tensor arriving at ``site``) into its recorder;
    ``valid [B, S]`` marks the tokens that are not padding. ``static``: a captured graph (or
    the warmup before one) records, so nothing may depend on the host's plan (``_record_static``)."""
    recorder = site.recorder
    assert recorder is not None
    if static:
        _record_static(x, site, recorder, valid)
    else:
        _record_planned(x, site, recorder, valid)


def _record_planned(x: torch.Tensor, site: SiteState, recorder: SiteRecorder, valid: torch.Tensor) -> None:
    """Encode only the plan's rows, each to its own width, as the host's plan says."""
    plan = recorder.plan
    assert plan is not None
    batch, seq, _ = x.shape
    count = len(plan.rows)
    every_row = count == batch  # the rows are distinct and ascending: 0..B-1, nothing to gather
    rows = recorder.batch_index[:count]  # [R]
    tokens = x if every_row else x.index_select(0, rows)  # [R, S, D]
    keep = valid if every_row else valid.index_select(0, rows)  # [R, S]
    # Rows of one width pad nothing past it: the plan says so on the host.
    uniform = all(width == plan.width for width in plan.widths)
    widths = None if uniform else recorder.row_width[:batch] if every_row else recorder.row_width.index_select(0, rows)  # [R]
    values, indices = recorder.output(batch, seq, plan.width)
    if not every_row:
        values.zero_()
        indices.fill_(PAD_INDEX)
    chunks = _recorded_chunks(tokens, site, keep, widths, _planned_layout(recorder, plan, count, seq, site.d_sae))
    for start, chunk_values, chunk_indices in chunks:
        for out, chunk in ((values, chunk_values), (indices, chunk_indices)):
            if every_row:
                out.view(count * seq, -1)[start : start + chunk.shape[0]] = chunk
            else:
                _scatter_rows(out, chunk, rows, seq, start)
    recorder.written_width = plan.width


def _record_static(x: torch.Tensor, site: SiteState, recorder: SiteRecorder, valid: torch.Tensor) -> None:
    """Encode every row to the buffers' full width and pad on the device: the rows, their
    widths and the request's kind come from the recorder's device tables, so a replay
    records whatever plan the host wrote before it."""
    batch, seq, _ = x.shape
    width = recorder.static_width
    values, indices = recorder.output(batch, seq, width)
    # Every buffered feature: a narrower SAE swapped in later reads zeros past its own.
    layout = _Layout(width, recorder.dense, site.W_enc.shape[1], recorder.dense_features[:width])
    chunks = _recorded_chunks(x, site, valid, recorder.row_width[:batch], layout)
    for start, chunk_values, chunk_indices in chunks:
        values.view(batch * seq, -1)[start : start + chunk_values.shape[0]] = chunk_values
        indices.view(batch * seq, -1)[start : start + chunk_indices.shape[0]] = chunk_indices
    recorder.written_width = width


class _Layout(NamedTuple):
    """What one forward's record holds per token."""

    width: int  # entries per token
    # The dense request's columns rather than top-k: for every token, or a bool tensor chosen on
    # the device, 0-d (a captured graph) or [tokens, 1] (each token's own kind: an engine's batch).
    dense: bool | torch.Tensor
    features: int  # SAE features encoded: the first ``features`` of the buffers
    columns: torch.Tensor  # [width] the dense request's features, or [tokens, width] each token's own


def _planned_layout(recorder: SiteRecorder, plan: RecordPlan, count: int, seq: int, features: int) -> _Layout:
    """The layout of ``plan``'s ``count`` recording rows of ``seq`` tokens each."""
    if plan.row_features is None:
        return _Layout(plan.width, plan.features is not None, features, recorder.dense_features[: plan.width])
    columns = recorder.row_features[:count, : plan.width].repeat_interleave(seq, 0)  # [R*S, width]
    dense = recorder.row_dense[:count].repeat_interleave(seq)[:, None]  # [R*S, 1]
    return _Layout(plan.width, dense, features, columns)


def _chunk_layout(layout: _Layout, span: slice) -> _Layout:
    """The part of ``layout`` for the tokens ``span``, where it holds one entry per token."""
    if layout.columns.dim() == 1:
        return layout
    return layout._replace(dense=layout.dense[span], columns=layout.columns[span])


def _recorded_chunks(
    x: torch.Tensor, site: SiteState, keep: torch.Tensor, widths: torch.Tensor | None, layout: _Layout
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start, values [n, width], indices [n, width])`` for each chunk of the tokens of ``x
    [R, S, D]``, padded where ``keep [R, S]`` is False and past each row's ``widths [R]``
    (``None``: every row records the full width)."""
    recorder = site.recorder
    assert recorder is not None
    rows, seq, d = x.shape
    tokens = x.reshape(rows * seq, d)  # [R*S, D]
    if site.layer_norm_input:
        tokens = torch_path.layer_norm_in(tokens)[0]
    pad = ~keep.reshape(-1, 1)  # [R*S, 1]
    if widths is not None:
        pad = pad | (torch.arange(layout.width, device=x.device) >= widths.repeat_interleave(seq)[:, None])  # [R*S, width]
    # One encode buffer for every chunk: a fresh one each time costs the CPU its page faults.
    scratch = tokens.new_empty(min(RECORD_CHUNK, rows * seq), layout.features)  # [chunk, F]
    for start in range(0, rows * seq, RECORD_CHUNK):
        span = slice(start, start + RECORD_CHUNK)
        pre = _encode(tokens[span], site, scratch[: tokens[span].shape[0]])  # [n, F]
        values, indices = _record_tokens(pre, site, _chunk_layout(layout, span))
        yield start, values.masked_fill_(pad[span], 0).to(recorder.values.dtype), indices.masked_fill_(pad[span], PAD_INDEX)


def _record_tokens(pre: torch.Tensor, site: SiteState, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [n, width], indices [n, width])`` of the tokens whose pre-activations are
    ``pre [n, F]`` (which it may overwrite): the features ``layout.columns`` where
    ``layout.dense`` holds, else each token's ``width`` largest."""
    dense = layout.dense
    static = isinstance(dense, torch.Tensor)  # the kind is chosen on the device: nothing read back
    threshold = site.threshold[: layout.features]
    columns = layout.columns.expand(pre.shape[0], -1)  # [n, width]
    if dense is True and site.activation != "topk":
        # ReLU and JumpReLU act feature by feature: the requested columns alone need it.
        return activate_(pre.gather(1, columns), site.activation, threshold[columns]), columns.clone()
    if dense is False and _shortcut_applies(pre, site, layout.width):
        return _largest_proven(pre, site, threshold, layout.width)
    f = activate_(pre, site.activation, threshold, site.k, static=static)
    if dense is True:
        return f.gather(1, columns), columns.clone()
    gathered = None if dense is False else f.gather(1, columns)  # before top-k, which may overwrite f
    values, indices = top_k_sorted(f, columns.shape[1], static=static)
    if gathered is None:
        return values, indices
    return torch.where(dense, gathered, values), torch.where(dense, columns, indices)


def _encode(x: torch.Tensor, site: SiteState, out: torch.Tensor) -> torch.Tensor:
    """``x @ W_enc + b_enc`` into ``out [n, F']``, over the first ``F'`` features; fewer than the
    buffers hold (a narrower SAE swapped in) read a column slice, slower than the whole matrix."""
    features = out.shape[1]
    if features == site.W_enc.shape[1]:
        return torch.addmm(site.b_enc, x, site.W_enc, out=out)
    return torch.addmm(site.b_enc[:features], x, site.W_enc[:, :features], out=out)


def top_k_sorted(f: torch.Tensor, k: int, *, static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of the non-negative ``f [n, F]`` and their indices, largest first and
    the lower index first among equal values; at a tie on the k-th value the lower indices
    are the ones kept (``top_k_indices``'s rule). On CUDA the selection is the TopK path's
    radix select; ``f`` may then be overwritten. ``static``: read nothing back on the host."""
    if not (f.is_cuda or static) and k < f.shape[1]:
        # On the CPU (a read-back is free): the k + 1 largest, sorted, are the rule's answer
        # unless two of them are equal; the exact path below sorts twice more.
        top = f.topk(k + 1, dim=1)
        if not bool((top.values[:, 1:] == top.values[:, :-1]).any()):
            return top.values[:, :k], top.indices[:, :k]
    # [n, k], in feature order; ``static=True`` skips top_k_indices's own CPU shortcut, just tried
    indices = triton_sae.top_k_features(f, k) if _use_triton(f) else top_k_indices(f, k, static=True).sort(dim=1).values
    values = f.gather(1, indices)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), indices.gather(1, order)


# Features per block when the CPU bounds each token's largest activations block by block (``_largest_by_bounds``).
TOP_K_BLOCK = 32


# Pre-activations from which a record's top-k bounds them by blocks: below it (a decode step's
# few tokens) the k + 1 largest of all cost less than the block bounds' extra ops.
BOUNDS_MIN_SIZE = 1 << 17


# A shortcut's answer: values [n, k], indices [n, k], and which tokens it proved ([n]; None: all).
Largest = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _shortcut_applies(pre: torch.Tensor, site: SiteState, k: int) -> bool:
    """Whether the CPU may select the ``k`` largest of ``act(pre)`` from ``pre`` itself
    (``_largest_proven``): it reads flags back on the host, and bounds ``act`` by
    ``relu(pre)``, which a TopK SAE's activation equals on its ``k`` largest only while the
    record's ``k`` is at most the SAE's."""
    if pre.is_cuda or k >= pre.shape[1]:
        return False
    return site.activation != "topk" or k <= site.k


def _largest_proven(
    pre: torch.Tensor, site: SiteState, threshold: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k_sorted(act(pre), k)`` for ``pre [n, F]`` without activating all of it: the
    tokens a shortcut cannot prove (a tie, fewer than ``k`` firing, a threshold hiding a
    large pre-activation) take the exact path, alone."""
    shortcut = _largest_by_bounds if _bounds_apply(pre, k) else _largest_directly
    values, indices, proven = shortcut(pre, site, threshold, k)
    if proven is not None:
        rows = (~proven).nonzero().squeeze(1)  # [r]
        f = activate_(pre.index_select(0, rows), site.activation, threshold, site.k)
        values[rows], indices[rows] = top_k_sorted(f, k)
    return values, indices


def _bounds_apply(pre: torch.Tensor, k: int) -> bool:
    """Whether ``pre [n, F]`` is large enough, and its blocks many enough, for the block bounds."""
    features = pre.shape[1]
    if pre.numel() < BOUNDS_MIN_SIZE or features % TOP_K_BLOCK:
        return False
    return features >= 4 * (k + 1) * TOP_K_BLOCK


def _largest_directly(pre: torch.Tensor, site: SiteState, threshold: torch.Tensor, k: int) -> Largest:
    """The ``k + 1`` largest pre-activations: their first ``k`` are a token's answer where
    all ``k + 1`` are distinct and the first ``k`` activate to themselves (pass their
    thresholds and 0), as every other activation is at most ``relu`` of the ``k + 1``-th."""
    top = pre.topk(k + 1, dim=1)  # [n, k + 1], sorted
    values, indices = top.values[:, :k], top.indices[:, :k]
    proven = top.values[:, 1:] < values  # [n, k]: distinct, as they are sorted
    if site.activation == "jumprelu":
        proven &= values > threshold[indices].clamp_(min=0)
    else:
        proven[:, -1] &= values[:, -1] > 0  # sorted: the k-th is positive, so are the others
    if bool(proven.all()):
        return values, indices, None
    return values, indices, proven.all(1)


def _largest_by_bounds(pre: torch.Tensor, site: SiteState, threshold: torch.Tensor, k: int) -> Largest:
    """The ``k`` largest activations among the ``k`` blocks of largest bound.

    Each block of ``TOP_K_BLOCK`` pre-activations bounds its activations by its maximum (or 0).
    Among the features of the ``k`` blocks of largest bound, the ``k`` largest activations are a
    token's answer where they and the next one are distinct and the ``k``-th exceeds the next
    block's bound: then nothing outside comes near it. That holds for nearly every token, as a
    block's bound is one of its activations unless a threshold hides it.
    """
    n, features = pre.shape
    count = features // TOP_K_BLOCK
    bounds = pre.view(n, count, TOP_K_BLOCK).amax(2).topk(k + 1, dim=1)  # [n, k + 1], sorted
    chosen = bounds.indices[:, :k]  # [n, k]
    # index_select of whole blocks: several times faster on the CPU than a gather of their features
    flat = (chosen + torch.arange(n, device=pre.device)[:, None] * count).view(-1)  # [n * k]
    candidates = pre.view(n * count, TOP_K_BLOCK).index_select(0, flat).view(n, -1)  # [n, k * block]
    limits = threshold.view(count, TOP_K_BLOCK).index_select(0, chosen.reshape(-1)).view(n, -1)
    activation = "relu" if site.activation == "topk" else site.activation  # act = relu on the SAE's k largest
    top = activate_(candidates, activation, limits).topk(k + 1, dim=1)
    values = top.values  # [n, k + 1]
    distinct = (values[:, 1:] != values[:, :-1]).all(1)  # [n]
    proven = distinct & (values[:, k - 1] > bounds.values[:, k])  # [n]
    position = top.indices[:, :k]  # [n, k]
    indices = chosen.gather(1, position // TOP_K_BLOCK) * TOP_K_BLOCK + position % TOP_K_BLOCK
    return values[:, :k], indices, None if bool(proven.all()) else proven


def _use_triton(f: torch.Tensor) -> bool:
    return f.is_cuda and triton_sae.TRITON_AVAILABLE and f.dtype in triton_sae.DTYPES


def _scatter_rows(out: torch.Tensor, chunk: torch.Tensor, rows: torch.Tensor, seq: int, start: int) -> None:
    """Write the chunk of recorded tokens ``start ..`` (row-major over the recording rows, each
    ``seq`` tokens long) into ``out [B, S, width]`` at the rows ``rows`` hold."""
    flat_positions = torch.arange(start, start + chunk.shape[0], device=chunk.device)  # [n]
    batch_rows = rows.index_select(0, flat_positions // seq)  # [n]
    out[batch_rows, flat_positions % seq] = chunk
