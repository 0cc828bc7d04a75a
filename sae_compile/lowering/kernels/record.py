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
from ...runtime.recording import SiteRecorder
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
    widths = recorder.row_width[:batch] if every_row else recorder.row_width.index_select(0, rows)  # [R]
    values, indices = recorder.output(batch, seq, plan.width)
    if not every_row:
        values.zero_()
        indices.fill_(PAD_INDEX)
    chunks = _recorded_chunks(tokens, site, keep, widths, _Layout(plan.width, plan.features is not None, site.d_sae))
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
    layout = _Layout(width, recorder.dense, site.W_enc.shape[1])
    chunks = _recorded_chunks(x, site, valid, recorder.row_width[:batch], layout)
    for start, chunk_values, chunk_indices in chunks:
        values.view(batch * seq, -1)[start : start + chunk_values.shape[0]] = chunk_values
        indices.view(batch * seq, -1)[start : start + chunk_indices.shape[0]] = chunk_indices
    recorder.written_width = width


class _Layout(NamedTuple):
    """What one forward's record holds per token."""

    width: int  # entries per token
    dense: bool | torch.Tensor  # the dense request's columns rather than top-k (a 0-d bool on the device: chosen there)
    features: int  # SAE features encoded: the first ``features`` of the buffers


def _recorded_chunks(
    x: torch.Tensor, site: SiteState, keep: torch.Tensor, widths: torch.Tensor, layout: _Layout
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(start, values [n, width], indices [n, width])`` for each chunk of the tokens of ``x
    [R, S, D]``, padded where ``keep [R, S]`` is False and past each row's ``widths [R]``."""
    recorder = site.recorder
    assert recorder is not None
    rows, seq, d = x.shape
    tokens = x.reshape(rows * seq, d)  # [R*S, D]
    if site.layer_norm_input:
        tokens = torch_path.layer_norm_in(tokens)[0]
    keep = keep.reshape(-1, 1)  # [R*S, 1]
    widths = widths.repeat_interleave(seq)[:, None]  # [R*S, 1]
    columns = torch.arange(layout.width, device=x.device)  # [width]
    for start in range(0, rows * seq, RECORD_CHUNK):
        span = slice(start, start + RECORD_CHUNK)
        values, indices = _record_tokens(tokens[span], site, recorder.dense_features[: layout.width], layout)
        pad = ~keep[span] | (columns >= widths[span])  # [n, width]
        yield start, values.masked_fill_(pad, 0).to(recorder.values.dtype), indices.masked_fill_(pad, PAD_INDEX)


def _record_tokens(
    x: torch.Tensor, site: SiteState, dense_features: torch.Tensor, layout: _Layout
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [n, width], indices [n, width])`` of the tokens ``x [n, D]``: the features
    ``dense_features [width]`` where ``layout.dense`` holds, else each token's ``width`` largest."""
    dense = layout.dense
    static = isinstance(dense, torch.Tensor)  # the kind is chosen on the device: a captured graph
    pre = _encode(x, site, layout.features)  # [n, F]
    f = activate_(pre, site.activation, site.threshold[: layout.features], site.k, static=static)
    columns = dense_features.expand(x.shape[0], -1)  # [n, width]
    if dense is True:
        return f.gather(1, columns), columns.clone()
    gathered = None if dense is False else f.gather(1, columns)  # before top-k, which may overwrite f
    values, indices = top_k_sorted(f, columns.shape[1], static=static)
    if gathered is None:
        return values, indices
    return torch.where(dense, gathered, values), torch.where(dense, columns, indices)


def _encode(x: torch.Tensor, site: SiteState, features: int) -> torch.Tensor:
    """``x @ W_enc + b_enc`` over the first ``features`` features; fewer than the buffers hold
    (a narrower SAE swapped in) read a column slice, which is slower than the whole matrix."""
    if features == site.W_enc.shape[1]:
        return torch.addmm(site.b_enc, x, site.W_enc)
    return torch.addmm(site.b_enc[:features], x, site.W_enc[:, :features])


def top_k_sorted(f: torch.Tensor, k: int, *, static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of the non-negative ``f [n, F]`` and their indices, largest first and
    the lower index first among equal values; at a tie on the k-th value the lower indices
    are the ones kept (``top_k_indices``'s rule). On CUDA the selection is the TopK path's
    radix select; ``f`` may then be overwritten. ``static``: read nothing back on the host."""
    if not (f.is_cuda or static) and k < f.shape[1]:
        # On the CPU (a read-back is free): the k + 1 largest, sorted, are the rule's answer
        # unless two of them are equal, which a trained SAE's firing features rarely are;
        # the exact path below sorts twice more.
        values, indices = _largest_sorted(f, k + 1)
        if not bool((values[:, 1:] == values[:, :-1]).any()):
            return values[:, :k], indices[:, :k]
    # [n, k], in feature order; ``static=True`` skips top_k_indices's own CPU shortcut, just tried
    indices = triton_sae.top_k_features(f, k) if _use_triton(f) else top_k_indices(f, k, static=True).sort(dim=1).values
    values = f.gather(1, indices)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), indices.gather(1, order)


# Features per block when the CPU picks the largest of each token in two steps (``_largest_sorted``).
TOP_K_BLOCK = 32


def _largest_sorted(f: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` largest of each row of ``f [n, F]`` and their indices, largest first, ties in
    any order. First the ``m`` blocks of ``TOP_K_BLOCK`` features with the largest maxima, then
    the ``m`` largest among their features: half the time of one ``topk`` over all of ``F``.

    Exact wherever the caller finds no tie among the ``m`` values: every feature outside the
    chosen blocks is at most the smallest chosen maximum, which is at most the ``m``-th value.
    """
    n, features = f.shape
    if features % TOP_K_BLOCK or features < 4 * m * TOP_K_BLOCK:
        top = f.topk(m, dim=1)
        return top.values, top.indices
    blocks = f.view(n, features // TOP_K_BLOCK, TOP_K_BLOCK)  # [n, F / block, block]
    chosen = blocks.amax(2).topk(m, dim=1, sorted=False).indices  # [n, m]
    candidates = blocks.gather(1, chosen[:, :, None].expand(-1, -1, TOP_K_BLOCK)).view(n, -1)  # [n, m * block]
    top = candidates.topk(m, dim=1)
    block_of = chosen.gather(1, top.indices // TOP_K_BLOCK)  # [n, m]
    return top.values, block_of * TOP_K_BLOCK + top.indices % TOP_K_BLOCK


def _use_triton(f: torch.Tensor) -> bool:
    return f.is_cuda and triton_sae.TRITON_AVAILABLE and f.dtype in triton_sae.DTYPES


def _scatter_rows(out: torch.Tensor, chunk: torch.Tensor, rows: torch.Tensor, seq: int, start: int) -> None:
    """Write the chunk of recorded tokens ``start ..`` (row-major over the recording rows, each
    ``seq`` tokens long) into ``out [B, S, width]`` at the rows ``rows`` hold."""
    flat_positions = torch.arange(start, start + chunk.shape[0], device=chunk.device)  # [n]
    batch_rows = rows.index_select(0, flat_positions // seq)  # [n]
    out[batch_rows, flat_positions % seq] = chunk
