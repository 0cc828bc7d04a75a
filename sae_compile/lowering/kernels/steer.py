"""One site's steering: which paths run, in which order, on which implementation.

Per token ``x`` of a steered row ``r``, in this order (DESIGN §4):

1. additive:  ``x <- x + add_vec[r]``
2. SAE edits with clamped features ``i`` becoming ``mul_i * f_i + shift_i``:
   - delta rows:        ``x <- x + sum_i (f'_i - f_i) W_dec[i]``   (error term kept)
   - reconstruct rows:  ``x <- f' @ W_dec + b_dec``                (error term dropped)

Delta rows of an elementwise SAE (ReLU/JumpReLU) only need the clamped features, so they
cost O(K·D) per token (the *sparse* path). Reconstruct rows and TopK SAEs need every
feature (the *full* path), computed only for the tokens that need it. Tokens that are not
steered come back bit-for-bit.
"""

from __future__ import annotations

import torch

from ...runtime.state import SiteState
from . import torch_path, triton_sae


def steer_site(x: torch.Tensor, site: SiteState) -> torch.Tensor:
    """Steer ``x [B, S, D]`` with the rows and edits ``site`` currently holds; returns a new tensor."""
    batch, seq, _ = x.shape
    rows, mask, weight = site.routing.view(batch, seq)  # [B], [B, S] bool, [B, S] 0/1
    # The host knows which paths any row needs; a captured graph must contain every path
    # a later replay may need, so under capture all of them run.
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    add = site.any_add or capturing
    sparse = site.any_sparse or (capturing and site.elementwise)
    full = site.any_full or (capturing and site.d_sae > 0)
    fused = x.is_cuda and triton_sae.TRITON_AVAILABLE
    out = x
    if fused and sparse:
        out = triton_sae.sparse_delta(out, rows, mask, site, with_add=add)
    else:
        if add:
            out = torch_path.add_vector(out, rows, weight, site)
        if sparse:
            out = torch_path.sparse_delta(out, rows, weight, site)
    if full:
        full_mask = mask & site.full_row[rows][:, None]  # [B, S]
        out = (triton_sae.full_path if fused else torch_path.full_path)(out, rows, full_mask, site)
    return x.clone() if out is x else out
