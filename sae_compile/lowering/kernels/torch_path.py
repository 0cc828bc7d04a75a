"""Plain-torch implementation of each steering path (DESIGN §4); runs on every device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...runtime.state import SiteState


def add_vector(x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, site: SiteState) -> torch.Tensor:
    """``x + add_vec[row]`` on steered tokens (``weight`` 1), ``x`` exactly elsewhere (``weight`` 0)."""
    return torch.addcmul(x, weight[..., None], site.add_vec[rows][:, None, :])  # [B, S, D]


def sparse_delta(x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, site: SiteState) -> torch.Tensor:
    """``x + sum_c coef_c * dec_c`` over each row's (pre-gathered) clamped features.

    Unused slots and other rows' tables are zero, and ``weight`` zeroes unsteered tokens,
    so their ``coef`` is exactly 0 and ``x`` comes back unchanged.
    """
    params = site.sparse_params[rows][:, None]  # [B, 1, 4, C]: b_enc, threshold, mul - 1, shift
    pre = torch.bmm(x, site.sparse_enc[rows].transpose(1, 2)).float() + params[..., 0, :]  # [B, S, C]
    f = pre * (pre > params[..., 1, :])  # [B, S, C] JumpReLU (ReLU: threshold 0)
    coef = torch.addcmul(params[..., 3, :], f, params[..., 2, :]) * weight[..., None]  # [B, S, C]
    return torch.baddbmm(x, coef.to(x.dtype), site.sparse_dec[rows])  # [B, S, D]


def full_path(x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, site: SiteState) -> torch.Tensor:
    batch, seq, d = x.shape
    flat = x.reshape(batch * seq, d)  # [N, D]
    token_rows = rows.repeat_interleave(seq)  # [N]
    token_mask = mask.reshape(-1)  # [N]
    if x.is_cuda:
        # No data-dependent sizes on the device: compute every token, keep the steered ones.
        steered = _full_tokens(flat, token_rows, site)
        return torch.where(token_mask[:, None], steered, flat).view(batch, seq, d)
    selected = token_mask.nonzero().squeeze(1)  # [n]; a host sync is free on the CPU
    out = flat.clone()
    out[selected] = _full_tokens(flat[selected], token_rows[selected], site)
    return out.view(batch, seq, d)


def _full_tokens(x: torch.Tensor, token_rows: torch.Tensor, site: SiteState) -> torch.Tensor:
    """Full-path steering of tokens ``x [n, D]`` whose rows are ``token_rows [n]``."""
    pre = F.linear(x, site.W_enc_t, site.b_enc)  # [n, F]
    if site.activation == "topk":
        top = torch.relu(pre).topk(site.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)  # [n, F]
    else:
        f = torch.where(pre > site.threshold, pre, torch.zeros_like(pre))  # [n, F]
    idx = site.clamp_idx[token_rows]  # [n, C]
    coef = (site.clamp_mul[token_rows] - 1.0) * f.gather(1, idx).float() + site.clamp_shift[token_rows]  # [n, C]
    df = torch.zeros_like(f).scatter_add(1, idx, coef.to(f.dtype))  # [n, F] = f' - f
    recon = site.reconstruct_row[token_rows][:, None]  # [n, 1]
    decoded = torch.where(recon, f + df, df) @ site.W_dec  # [n, D]
    return torch.where(recon, decoded + site.b_dec, x + decoded)
