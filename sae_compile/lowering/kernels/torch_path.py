"""Plain-torch implementation of each steering path (DESIGN §4); runs on every device."""

from __future__ import annotations

import torch

from ...runtime.state import SiteState
from ...sae import top_k_indices


def add_vector(x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, site: SiteState) -> torch.Tensor:
    """``x + add_vec[row]`` on steered tokens (``weight`` 1), ``x`` exactly elsewhere (``weight`` 0)."""
    return torch.addcmul(x, weight[..., None], site.add_vec[rows][:, None, :])  # [B, S, D]


def sparse_delta(
    x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, site: SiteState, span: slice = slice(None)
) -> torch.Tensor:
    """``x + sum_c coef_c * dec_c`` over each row's (pre-gathered) clamped features.

    ``span`` is a contiguous range of steering rows that holds every row this batch uses
    with sparse edits (default: all rows). Its tables are read in place, as ``K = rows x C``
    feature columns shared by the whole batch; each token keeps only its own row's columns.
    Unused slots and other rows' columns get ``coef`` exactly 0, as do unsteered tokens
    (``weight`` 0), so those tokens come back unchanged.
    """
    batch, seq, d = x.shape
    first, stop, _ = span.indices(site.sparse_enc.shape[0])
    enc = site.sparse_enc[first:stop].flatten(0, 1)  # [K, D], a view
    dec = site.sparse_dec[first:stop].flatten(0, 1)  # [K, D], a view
    params = site.sparse_params[first:stop].transpose(0, 1).flatten(1)  # [4, K]: b_enc, threshold, mul - 1, shift
    clamps = site.sparse_enc.shape[1]
    column_row = torch.arange(first, stop, device=x.device).repeat_interleave(clamps)  # [K]
    own = (rows[:, None] == column_row).to(weight.dtype)[:, None, :] * weight[..., None]  # [B, S, K]
    flat = x.reshape(batch * seq, d)  # [N, D]
    pre = (flat @ enc.t()).float().view(batch, seq, -1) + params[0]  # [B, S, K]
    f = pre * (pre > params[1])  # [B, S, K] JumpReLU (ReLU: threshold 0)
    coef = torch.addcmul(params[3], f, params[2]) * own  # [B, S, K] = f' - f on the token's own row
    return torch.addmm(flat, coef.view(batch * seq, -1).to(x.dtype), dec).view(batch, seq, d)


# Tokens per full-path step: bounds the [tokens, F] scratch (a long prefill through a wide
# SAE would otherwise hold gigabytes) while keeping the matmuls large enough to be efficient.
FULL_PATH_CHUNK = 256


def full_path(x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, site: SiteState) -> torch.Tensor:
    """Full-encode steering of the tokens in ``mask [B, S]`` whose row is a full row (Reconstruct,
    or clamps on a TopK SAE); every other token is copied exactly. Scratch is O(FULL_PATH_CHUNK·F)."""
    batch, seq, d = x.shape
    flat = x.reshape(batch * seq, d)  # [N, D]
    token_rows = rows.repeat_interleave(seq)  # [N]
    token_mask = (mask & site.full_row[rows][:, None]).reshape(-1)  # [N]
    if x.is_cuda:
        # No data-dependent sizes on the device: compute every token, keep the steered ones.
        out = torch.empty_like(flat)
        for start in range(0, batch * seq, FULL_PATH_CHUNK):
            span = slice(start, start + FULL_PATH_CHUNK)
            steered = _full_tokens(flat[span], token_rows[span], site)
            out[span] = torch.where(token_mask[span, None], steered, flat[span])
        return out.view(batch, seq, d)
    selected = token_mask.nonzero().squeeze(1)  # [n]; a host sync is free on the CPU
    out = flat.clone()
    for span in selected.split(FULL_PATH_CHUNK):
        out[span] = _full_tokens(flat[span], token_rows[span], site)
    return out.view(batch, seq, d)


def _full_tokens(x: torch.Tensor, token_rows: torch.Tensor, site: SiteState) -> torch.Tensor:
    """Full-path steering of tokens ``x [n, D]`` whose rows are ``token_rows [n]``.

    Works in one ``[n, F]`` buffer, in place: the encode writes it, the activation and the
    clamps edit it, the decode reads it. That is the bare SAE's own memory traffic, plus a
    ``[n, F]`` mask for JumpReLU; on the CPU the decode may read fewer rows (``_decode``).
    """
    f = torch.addmm(site.b_enc, x, site.W_enc)  # [n, F] pre-activations
    if site.activation == "topk":
        top = top_k_indices(f.relu_(), site.k)  # [n, k]
        values = f.gather(-1, top)  # [n, k]
        f.zero_().scatter_(-1, top, values)  # [n, F]
    else:
        # JumpReLU (ReLU: threshold 0) as a product with a 0/1 float mask: on the CPU, ops that
        # read or write bool tensors (masked_fill_, where) cost as much as the encode matmul.
        f.mul_(torch.gt(f, site.threshold, out=torch.empty_like(f)))  # [n, F]
    idx = site.clamp_idx[token_rows]  # [n, C]
    coef = (site.clamp_mul[token_rows] - 1.0) * f.gather(1, idx).float() + site.clamp_shift[token_rows]  # [n, C]
    recon = site.reconstruct_row[token_rows][:, None]  # [n, 1]
    # Reconstruct tokens decode f' = f + (f' - f); the others decode only f' - f and keep x.
    f.mul_(recon)
    f.scatter_add_(1, idx, coef.to(f.dtype))  # [n, F]
    decoded = _decode(f, site.W_dec)  # [n, D]
    return torch.where(recon, decoded + site.b_dec, x + decoded)


# A decode reads only the decoder rows of the features its tokens use when at most this share
# of the features is used. A trained SAE fires tens of features per token, so a decode step's
# few tokens use a few percent of them; past about this share, gathering the rows costs more
# than reading them all.
SPARSE_DECODE_MAX_SHARE = 1 / 8


def _decode(f: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``f @ W_dec`` for ``f [n, F]``. On the CPU, when few features are non-zero in any token,
    over only those features' rows: the terms it leaves out are exact zeros."""
    if f.is_cuda or f.shape[0] == 0:
        return f @ W_dec  # choosing would need the count on the host; no token, nothing to choose
    used = f.abs().amax(0).nonzero().squeeze(1)  # [u] features some token uses
    if used.numel() > SPARSE_DECODE_MAX_SHARE * f.shape[1]:
        return f @ W_dec
    return f.index_select(1, used) @ W_dec.index_select(0, used)  # [n, u] @ [u, D]; faster than [used] here
