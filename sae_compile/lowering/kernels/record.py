"""Recording a site's SAE features inside the steering op, before the site's own edits.

For the batch rows a site's ``RecordPlan`` names, and only for them, the op runs the full
encode ``f = act(x @ W_enc + b_enc)`` (``b_dec`` folded into ``b_enc`` as for steering; ``x``
layer-normalised first for an SAE with ``layer_norm_input``) a chunk of tokens at a time, then keeps each token's ``width`` largest (top-k) or the dense
request's columns, and writes them into the site's static record buffers. Every other
entry of the ``[B, S, width]`` record is padding: value 0 and, for top-k, index -1.
"""

from __future__ import annotations

import torch

from ...activations import activate_, top_k_indices
from ...features import PAD_INDEX
from ...runtime.recording import SiteRecorder
from ...runtime.state import SiteState
from . import torch_path, triton_sae

# Tokens per encode step: bounds the [tokens, F] scratch as the full steering path does.
RECORD_CHUNK = 256


def record_site(x: torch.Tensor, site: SiteState, valid: torch.Tensor) -> None:
    """Write the record of ``x [B, S, D]`` (the tensor arriving at ``site``) into its recorder;
    ``valid [B, S]`` marks the tokens that are not padding."""
    recorder = _recorder(site, x)
    batch, seq, d = x.shape
    count = len(recorder.plan.rows)
    every_row = count == batch  # the rows are distinct and ascending: 0..B-1, nothing to gather
    rows = recorder.batch_index[:count]  # [R]
    tokens = (x if every_row else x.index_select(0, rows)).reshape(count * seq, d)  # [R*S, D]
    if site.layer_norm_input:
        tokens = torch_path.layer_norm_in(tokens)[0]
    keep = (valid if every_row else valid.index_select(0, rows)).reshape(-1, 1)  # [R*S, 1]
    widths = recorder.row_width[:count].repeat_interleave(seq)[:, None]  # [R*S, 1]
    values, indices = recorder.output(batch, seq)
    if not every_row:
        values.zero_()
        indices.fill_(PAD_INDEX)
    for start in range(0, count * seq, RECORD_CHUNK):
        span = slice(start, start + RECORD_CHUNK)
        chunk_values, chunk_indices = _record_tokens(tokens[span], site, recorder)
        pad = ~keep[span] | (torch.arange(chunk_values.shape[1], device=x.device) >= widths[span])
        for out, chunk, fill in ((values, chunk_values, 0), (indices, chunk_indices, PAD_INDEX)):
            chunk = chunk.masked_fill_(pad, fill).to(out.dtype)
            if every_row:
                out.view(count * seq, -1)[span] = chunk
            else:
                _scatter_rows(out, chunk, rows, seq, start)


def _recorder(site: SiteState, x: torch.Tensor) -> SiteRecorder:
    """The site's recorder, marked as written; recording inside a CUDA-graph capture raises."""
    recorder = site.recorder
    assert recorder is not None and recorder.plan is not None
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"sae_compile: {site.name} records features, which a captured CUDA graph cannot: its replays "
            "would keep this forward's rows. Record without CUDA graphs."
        )
    recorder.wrote = True
    return recorder


def _record_tokens(x: torch.Tensor, site: SiteState, recorder: SiteRecorder) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [n, width], indices [n, width])`` of the tokens ``x [n, D]``."""
    f = activate_(_encode(x, site), site.activation, site.threshold[: site.d_sae], site.k)
    plan = recorder.plan
    assert plan is not None
    if plan.features is not None:
        indices = recorder.dense_features[: plan.width].expand(x.shape[0], -1)  # [n, width]
        return f.gather(1, indices), indices.clone()
    return top_k_sorted(f, plan.width)


def _encode(x: torch.Tensor, site: SiteState) -> torch.Tensor:
    """``x @ W_enc + b_enc`` over the SAE's own features; a narrower SAE swapped into wider
    buffers reads a column slice, which is slower than the whole matrix."""
    if site.d_sae == site.W_enc.shape[1]:
        return torch.addmm(site.b_enc, x, site.W_enc)
    return torch.addmm(site.b_enc[: site.d_sae], x, site.W_enc[:, : site.d_sae])


def top_k_sorted(f: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of the non-negative ``f [n, F]`` and their indices, largest first and
    the lower index first among equal values; at a tie on the k-th value the lower indices
    are the ones kept (``top_k_indices``'s rule). On CUDA the selection is the TopK path's
    radix select; ``f`` may then be overwritten."""
    # [n, k], in feature order
    indices = triton_sae.top_k_features(f, k) if _use_triton(f) else top_k_indices(f, k).sort(dim=1).values
    values = f.gather(1, indices)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), indices.gather(1, order)


def _use_triton(f: torch.Tensor) -> bool:
    return f.is_cuda and triton_sae.TRITON_AVAILABLE and f.dtype in triton_sae.DTYPES


def _scatter_rows(out: torch.Tensor, chunk: torch.Tensor, rows: torch.Tensor, seq: int, start: int) -> None:
    """Write the chunk of recorded tokens ``start ..`` (row-major over the recording rows, each
    ``seq`` tokens long) into ``out [B, S, width]`` at the rows ``rows`` hold."""
    flat_positions = torch.arange(start, start + chunk.shape[0], device=chunk.device)  # [n]
    batch_rows = rows.index_select(0, flat_positions // seq)  # [n]
    out[batch_rows, flat_positions % seq] = chunk
