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

from ...runtime.state import Paths, SiteState, every_path_active
from . import torch_path, triton_sae


def steer_site(x: torch.Tensor, site: SiteState) -> torch.Tensor:
    """Steer ``x`` with the rows and edits ``site`` currently holds; returns a new, contiguous tensor.

    ``x`` is ``[B, S, D]`` (each batch row routed to a steering row) or token-major
    ``[N, D]`` (each token routed to its own row, as an engine's flattened batch is). An ``x``
    in another dtype than the site's (an engine that adds the residual stream in fp32) is
    steered in the site's dtype, and its unsteered tokens come back exactly.
    """
    if site.broken is not None:
        raise RuntimeError(f"sae_compile: {site.broken}; call load_sae() again with a valid SAE to repair it.")
    if x.dim() == 2:
        return _steer_tokens(x, site)
    batch, seq, _ = x.shape
    return _steer_rows(x, site, *site.routing.view(batch, seq))


def _steer_tokens(x: torch.Tensor, site: SiteState) -> torch.Tensor:
    """Token-major ``x [N, D]``: a batch of ``N`` one-token rows, each with its token's row."""
    tokens, d = x.shape
    rows, mask, weight = site.routing.view_tokens(tokens)  # [N], [N, 1], [N, 1]
    if x.dtype == site.dtype:
        return _steer_rows(x.view(tokens, 1, d), site, rows, mask, weight).view(tokens, d)
    steered = _steer_rows(x.to(site.dtype).view(tokens, 1, d), site, rows, mask, weight).view(tokens, d)
    return torch.where(mask, steered.to(x.dtype), x)


def _steer_rows(x: torch.Tensor, site: SiteState, rows: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [B, S, D]`` with batch row ``b`` using steering row ``rows[b]`` on the tokens of ``mask``."""
    source = x
    x = x.contiguous()  # [B, S, D]; every path below returns x's layout
    paths = _paths(x, site, x.shape[0])
    fused = x.is_cuda and triton_sae.TRITON_AVAILABLE and x.dtype in triton_sae.DTYPES
    out = x
    if fused and paths.sparse:
        out = triton_sae.sparse_delta(out, rows, mask, site, with_add=paths.add)
    else:
        if paths.add:
            out = torch_path.add_vector(out, rows, weight, site)
        if paths.sparse:
            out = torch_path.sparse_delta(out, rows, weight, site)
    if paths.full and fused:
        out = triton_sae.full_path(out, rows, mask, site, in_place=out is not x)
    elif paths.full:
        out = torch_path.full_path(out, rows, mask, site)
    return x.clone() if out is source else out


def _paths(x: torch.Tensor, site: SiteState, batch: int) -> Paths:
    """The host knows which paths the assigned rows need. A captured graph must contain every
    path a later replay may need, so under capture (and in the warmup before it) all run."""
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    return site.capture_paths() if capturing or every_path_active() else site.live_paths(batch)
