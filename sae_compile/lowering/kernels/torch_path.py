"""Plain-torch implementation of each steering path (DESIGN §4); runs on every device."""

from __future__ import annotations

import torch

from ...activations import activate_, jumprelu_, layer_norm
from ...runtime.state import SiteState, declared_paths


def add_vector(x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, site: SiteState) -> torch.Tensor:
    """``x + add_vec[row]`` on steered tokens (``weight`` 1), ``x`` exactly elsewhere (``weight`` 0)."""
    return torch.addcmul(x, weight[..., None], site.add_vec[rows][:, None, :])  # [B, S, D]


def layer_norm_in(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_n, mu, std)`` of ``x [..., D]`` for an SAE that layer-normalises its input
    (``activations.layer_norm``), computed in at least fp32; ``x_n`` is returned in ``x``'s dtype,
    the one the SAE paths run in, ``mu`` and ``std`` ``[..., 1]`` in the wider dtype."""
    x_n, mu, std = layer_norm(x.to(torch.promote_types(x.dtype, torch.float32)))
    return x_n.to(x.dtype), mu, std


def layer_norm_out(
    x: torch.Tensor, x_n: torch.Tensor, y_n: torch.Tensor, mu: torch.Tensor, std: torch.Tensor,
    reconstruct: torch.Tensor, mask: torch.Tensor,
) -> torch.Tensor:
    """Map the SAE paths' output ``y_n`` (from ``x_n = LN(x)``) back to ``x``'s space.

    ``reconstruct [B, S]`` tokens become ``y_n * std + mu`` (the decode of OpenAI's autoencoders);
    the other ``mask [B, S]`` tokens ``x + std * (y_n - x_n)``: the delta the paths added in the
    normalised space, ``(f' - f) @ W_dec``, scaled as their decode scales it. Tokens outside
    ``mask`` are ``x`` exactly. ``x``, ``x_n``, ``y_n`` are ``[B, S, D]``; ``mu``, ``std`` ``[B, S, 1]``.
    """
    wide = mu.dtype
    delta = torch.addcmul(x.to(wide), std, y_n.to(wide) - x_n.to(wide))  # [B, S, D]
    rebuilt = torch.addcmul(mu, y_n.to(wide), std)  # [B, S, D]
    out = torch.where(reconstruct[..., None], rebuilt, delta).to(x.dtype)
    return torch.where(mask[..., None], out, x)


# Batch rows per sparse-delta step. The step gathers each row's ``C`` encoder and decoder rows
# (``[B, C, D]`` each); a token-major forward is a batch of one-token rows, so a long prefill
# would otherwise gather gigabytes.
SPARSE_PATH_CHUNK = 256


def sparse_delta(x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, site: SiteState) -> torch.Tensor:
    """``x + sum_c coef_c * sparse_dec[r, c]`` over the (pre-gathered) clamped features ``c``
    of each batch row's steering row ``r``.

    ``coef_c = shift_c + f_c * (mul_c - 1)`` with ``f_c = JumpReLU(x @ sparse_enc[r, c] + b_enc_c)``
    (SAELens's ``relu(pre) * (pre > threshold)``; a ReLU SAE's threshold is 0).
    Unused slots, rows that are not sparse delta rows (all-zero tables) and unsteered tokens
    (``weight`` 0) get ``coef`` exactly 0, so those tokens come back unchanged. Works through
    ``SPARSE_PATH_CHUNK`` batch rows at a time.
    """
    if x.shape[0] <= SPARSE_PATH_CHUNK:
        return _sparse_delta_rows(x, rows, weight, site)
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], SPARSE_PATH_CHUNK):
        span = slice(start, start + SPARSE_PATH_CHUNK)
        out[span] = _sparse_delta_rows(x[span], rows[span], weight[span], site)
    return out


def _sparse_delta_rows(x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, site: SiteState) -> torch.Tensor:
    tables = site.sparse_tables(rows)
    pre = torch.bmm(x, tables.enc_t).float() + tables.b_enc  # [B, S, C]; x @ enc at model precision
    f = jumprelu_(pre, tables.threshold)  # [B, S, C] (ReLU: threshold 0)
    coef = torch.addcmul(tables.shift, f, tables.mul_m1) * weight[..., None]  # [B, S, C] = f' - f on steered tokens
    return torch.baddbmm(x, coef.to(x.dtype), tables.dec)  # [B, S, D]


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
    if x.is_cuda or declared_paths() is not None:
        # No data-dependent sizes on the device or in a captured graph: compute every token, keep the steered ones.
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
    pre = torch.addmm(site.b_enc, x, site.W_enc)  # [n, F]
    f = activate_(pre, site.activation, site.threshold, site.k, static=declared_paths() is not None)
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
# Only this many tokens are checked: many more use most features, and the check (a pass over
# the [n, F] features) would then cost a few percent of the decode for nothing.
SPARSE_DECODE_MAX_TOKENS = 64


def _decode(f: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``f @ W_dec`` for ``f [n, F]``. On the CPU, for a few tokens that use few features between
    them, over only those features' rows: the terms it leaves out are exact zeros."""
    if f.is_cuda or declared_paths() is not None or not 0 < f.shape[0] <= SPARSE_DECODE_MAX_TOKENS:
        return f @ W_dec  # on CUDA or in a captured graph, choosing would need the count on the host
    used = f.abs().amax(0).nonzero().squeeze(1)  # [u] features some token uses
    if used.numel() > SPARSE_DECODE_MAX_SHARE * f.shape[1]:
        return f @ W_dec
    return f.index_select(1, used) @ W_dec.index_select(0, used)  # [n, u] @ [u, D]; faster than [used] here
